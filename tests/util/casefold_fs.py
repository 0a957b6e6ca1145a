#!/usr/bin/env python3
"""A case-insensitive, case-preserving passthrough filesystem (as macOS's default APFS
behaves), for tests: `casefold_fs.py BACKING MOUNTPOINT` serves BACKING at MOUNTPOINT
until unmounted. Each path component is looked up ignoring case; creating a name that
matches an existing one in another case fails with EEXIST."""

import errno
import os
import sys

from fuse import FUSE, FuseOSError, Operations


class CaseFold(Operations):
    def __init__(self, root):
        self.root = root

    def _find(self, parent, name):
        """The real name in `parent` matching `name` ignoring case, or None."""
        if os.path.lexists(os.path.join(parent, name)):
            return name
        try:
            for entry in os.listdir(parent):
                if entry.casefold() == name.casefold():
                    return entry
        except OSError:
            pass
        return None

    def _real(self, path, create=False):
        """Resolves `path` component by component; with `create`, the last component
        must not exist in any case."""
        real = self.root
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            found = self._find(real, part)
            last = i == len(parts) - 1
            if last and create:
                if found is not None:
                    raise FuseOSError(errno.EEXIST)
                return os.path.join(real, part)
            real = os.path.join(real, found if found is not None else part)
        return real

    def access(self, path, mode):
        if not os.access(self._real(path), mode, follow_symlinks=False):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._real(path))
        # The backing inode (with use_ino below), as real case-insensitive filesystems
        # (APFS, NTFS, vfat) give one inode to every spelling of a name.
        keys = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime",
                "st_mtime", "st_ctime")
        out = {k: getattr(st, k) for k in keys}
        out["st_atime"] = st.st_atime_ns / 1e9
        out["st_mtime"] = st.st_mtime_ns / 1e9
        return out

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._real(path))

    def readlink(self, path):
        return os.readlink(self._real(path))

    def mkdir(self, path, mode):
        os.mkdir(self._real(path, create=True), mode)

    def rmdir(self, path):
        os.rmdir(self._real(path))

    def unlink(self, path):
        os.unlink(self._real(path))

    def symlink(self, target, source):
        os.symlink(source, self._real(target, create=True))

    def rename(self, old, new):
        os.rename(self._real(old), self._real(new))

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)

    def chown(self, path, uid, gid):
        os.lchown(self._real(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._real(path), times, follow_symlinks=False)

    def truncate(self, path, length, fh=None):
        with open(self._real(path), "r+b") as f:
            f.truncate(length)

    def statfs(self, path):
        st = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def open(self, path, flags):
        return os.open(self._real(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._real(path, create=True), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path, length, offset, fh):
        os.lseek(fh, offset, os.SEEK_SET)
        return os.read(fh, length)

    def write(self, path, buf, offset, fh):
        os.lseek(fh, offset, os.SEEK_SET)
        return os.write(fh, buf)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        os.fsync(fh)


if __name__ == "__main__":
    # The kernel's caches of names and attributes are case-sensitive: kept, they would
    # give `notes.txt` and `Notes.txt` different files after a rename over one.
    FUSE(CaseFold(sys.argv[1]), sys.argv[2], foreground=True, nothreads=True, use_ino=True,
         entry_timeout=0, attr_timeout=0, negative_timeout=0)
