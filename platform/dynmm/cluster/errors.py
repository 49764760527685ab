"""What can go wrong between this machine and a cluster; each is a ``UserError`` (one line, exit code 2)."""

from dynmm.errors import UserError


class ClusterError(UserError):
    """A cluster address, token or job the user gave that does not work."""


class ClusterUnreachableError(ClusterError):
    """Nothing answers at the address (wrong host or port, cluster down, port-forward not running)."""


class ClusterAuthError(ClusterError):
    """The job server wants a token and none was found, or it refused the one sent."""


class JobNotFoundError(ClusterError):
    """The cluster has no job with that id."""


class WorkingDirTooLargeError(ClusterError):
    """The files a job would upload exceed what Ray accepts in one package."""
