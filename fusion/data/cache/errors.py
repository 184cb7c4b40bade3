"""What can go wrong with a feature cache; every message names the cache folder involved."""

from __future__ import annotations


class CacheError(Exception):
    """Base class: a feature cache cannot be opened, built or read."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No complete cache at the expected folder (never built, or a build that did not finish)."""


class CacheCorruptError(CacheError):
    """A published cache whose files disagree with each other (truncated array, bad index...)."""


class FingerprintMismatchError(CacheError):
    """A cache built for another encoder, preprocessing or dtype than the configured one."""


class CacheKeyError(CacheError, KeyError):
    """An image key that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message and wrap it in quotes
        return str(self.args[0]) if self.args else ""


class CacheWriteError(CacheError, OSError):
    """The cache folder cannot be written (permissions, read-only, disk full)."""


class CacheUnverifiableError(CacheError):
    """A cache built before caches recorded checksums: it opens, but its rows cannot be verified."""
