"""``ipvs2nft daemon``: what a static ruleset cannot do by itself.

The talk's "ruleset mng & health daemon": one process per network
namespace, in the foreground (systemd ``Type=notify``), that

* follows the state file ipvsadm writes (``follow``) and the connections
  conntrack reports (``conntable``), so that lc/wlc/sed/nq/ovf/lblc/lblcr and
  the thresholds choose what IPVS would choose (``publish`` hands the data
  plane its next choices);
* keeps IPVS's rate estimator over the kernel's counters (``estimator``)
  and answers ipvsadm's questions on a local socket (``control``);
* carries out ipvsadm's changes when ipvsadm hands them over that socket
  (``mutate``): ipvsadm's own code, run in the daemon's process.

It shares the model, the store and the nftables back end with ipvsadm.  The
state file is written by ipvsadm's code alone (in its own process, or in
the daemon's through ``mutate``, under the same lock); the counts belong to
the kernel, the rates and the predictions to the daemon.  Killed, it leaves
a ruleset that keeps forwarding with the last choices it published.
"""
