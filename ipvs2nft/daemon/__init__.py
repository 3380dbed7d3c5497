"""``ipvs2nft daemon``: what a static ruleset cannot do by itself.

The talk's "ruleset mng & health daemon": one process per network
namespace, in the foreground (systemd ``Type=notify``), that

* follows the state file ipvsadm writes (``follow``) and the connections
  conntrack reports (``conntable``), so that lc/wlc/sed/nq/ovf/lblc/lblcr and
  the thresholds choose what IPVS would choose (``publish`` hands the data
  plane its next choices);
* keeps IPVS's rate estimator over the kernel's counters (``estimator``)
  and answers ipvsadm's questions on a local socket (``control``).

It shares the model, the store and the nftables back end with ipvsadm and
never writes the state file: the store belongs to ipvsadm, the counts to
the kernel, the rates and the predictions to the daemon.  Killed, it leaves
a ruleset that keeps forwarding with the last choices it published.
"""
