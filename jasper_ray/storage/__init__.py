"""Storage: where dataset files live (local paths, ``pyarrow.fs`` URIs) and the node-local cache of them.

Below ``formats/``: it moves and keeps bytes and knows nothing of what they
mean; the format layer says which files a dataset needs and how to check them.
"""

from .cache import CACHE_ENV, NodeCache, default_cache_dir
from .fetch import RemoteIdentity, download, remote_identity
from .location import Location, is_uri, locate

__all__ = [
    "CACHE_ENV",
    "Location",
    "NodeCache",
    "RemoteIdentity",
    "default_cache_dir",
    "download",
    "is_uri",
    "locate",
    "remote_identity",
]
