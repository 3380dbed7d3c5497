"""Typed errors that carry ipvsadm's exact message and exit status.

The CLI turns them into output in one place (``cli/ipvsadm.py``); nothing else
prints an error or calls ``sys.exit``.  The classes mirror how ipvsadm 1.31
ends, because scripts branch on the exit status:

* ``UsageError``  -- ipvsadm's own ``fail(2, ...)``: validation before the kernel.
* ``TryHelp``     -- ``tryhelp_exit(argv0, -1)``: exit 255.
* ``PoptError``   -- popt reports a bad option after the command: exit 255, but
  ``-R`` carries on with the next line.
* ``KernelError`` -- what the IPVS kernel code refuses (``Service already
  exists``...): exit 255, ``-R`` carries on.
* ``ListError``   -- a listing that cannot be produced: exit 1.
* ``Ipvs2nftError`` -- failures that ipvsadm has no wording for (lock timeout,
  nftables refused the ruleset, broken state file...).
"""

from __future__ import annotations


class IpvsadmError(Exception):
    """Base: ``message`` goes to stderr as-is, followed by a newline."""

    status: int = 2

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class UsageError(IpvsadmError):
    """Client-side validation, ipvsadm's ``fail(2, ...)``; aborts ``-R``."""

    status = 2


class TryHelp(IpvsadmError):
    """No command, or a bad first option: the ``Try `ipvsadm -h'`` line."""

    status = 255

    def __init__(self, argv0: str) -> None:
        super().__init__(f"Try `{argv0} -h' or '{argv0} --help' for more information.")


class PoptError(IpvsadmError):
    """popt error on an option after the command (``--foo: unknown option``)."""

    status = 255


class KernelError(IpvsadmError):
    """The IPVS kernel code refused the operation (libipvs ``ipvs_strerror``)."""

    status = 255


class ListError(IpvsadmError):
    """A listing failed (``No such service`` for ``-L -t``): exit 1."""

    status = 1


class Ipvs2nftError(IpvsadmError):
    """A failure of ipvs2nft itself (store, lock, nftables)."""

    status = 2


class LockTimeout(Ipvs2nftError):
    """Another ipvsadm held the state lock for longer than the wait bound."""

    status = 4


class StoreError(Ipvs2nftError):
    """The state file is unreadable, corrupt, or cannot be written."""

    status = 2


class BackendError(Ipvs2nftError):
    """nftables refused the transaction, or is not available."""

    status = 2


class Exit(Exception):
    """Normal early end with output already produced (``-h``, ``-v``)."""

    def __init__(self, status: int = 0) -> None:
        super().__init__(status)
        self.status = status


def internal_error(exc: Exception) -> int:
    """A bug: one line on stderr instead of a traceback, status 2.

    ``IPVS2NFT_DEBUG=1`` re-raises so that the traceback can be reported.
    """
    import os
    import sys

    if os.environ.get("IPVS2NFT_DEBUG"):
        raise exc
    sys.stderr.write(f"ipvs2nft: internal error ({type(exc).__name__}: {exc}); please report it\n")
    return 2
