//! Restores where CI runs them: as an unprivileged user over read-only trees, into
//! symlinked, mounted and read-only-parent directories, against crafted entries, with
//! a full disk, and when the job is cancelled.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cacher::chunk::format::{Entry, EntryKind, Manifest};

use crate::util::proxy::{Fault, Proxy};
use crate::util::{
    TestEnv, bucket, can_switch_users, put_object, random_bytes, rt, server, sh, snapshot, stored,
    temp_leftovers,
};

/// A Go module cache: the same top-level names in every version, 0555 directories and
/// 0444 files, as `go mod download` leaves them.
fn module_cache(env: &TestEnv, name: &str, version: u32) -> PathBuf {
    let root = env.path(name);
    for module in ["alpha", "beta"] {
        env.write(
            &format!("{name}/github.com/x/{module}@v1.{version}.0/go.mod"),
            format!("module github.com/x/{module}\n// v{version}\n"),
        );
        env.write(
            &format!("{name}/github.com/x/{module}@v1.{version}.0/lib.go"),
            random_bytes(40_000 + version as usize, version.into()),
        );
    }
    env.write(
        &format!("{name}/cache/download/github.com/x/alpha/@v/list"),
        format!("v1.{version}.0\n"),
    );
    sh(
        &format!(
            "find '{0}' -type f -exec chmod 444 {{}} + && find '{0}' -type d -exec chmod 555 {{}} + && find '{0}' -exec touch -h -d '2022-03-04 05:06:07' {{}} +",
            root.display()
        ),
        env.dir.path(),
    );
    root
}

/// Makes a tree writable again so the temp dir can be removed.
fn unlock(path: &Path) {
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(path).status();
}

/// Names of `.cacher-*` leftovers in `dir` and, when it exists, in its parent.
fn leftovers_around(dir: &Path) -> Vec<String> {
    let mut found = temp_leftovers(dir.parent().unwrap());
    if dir.is_dir() {
        found.extend(temp_leftovers(dir));
    }
    found
}

#[test]
fn restores_over_a_read_only_tree_as_an_unprivileged_user() {
    if !can_switch_users("restores_over_a_read_only_tree_as_an_unprivileged_user") {
        return;
    }
    let env = TestEnv::s3("nonroot");
    let v1 = module_cache(&env, "v1", 1);
    let v2 = module_cache(&env, "v2", 2);
    env.run(["dir", "upload", "gomod/1", v1.to_str().unwrap()])
        .ok();
    env.run(["dir", "upload", "gomod/2", v2.to_str().unwrap()])
        .ok();
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    env.give_to_nobody(&work);
    let out = work.join("mod");

    env.run_unprivileged(["dir", "download", "gomod/1", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&v1));
    let owner = std::fs::metadata(out.join("github.com")).unwrap().uid();
    assert_eq!(
        owner,
        crate::util::NOBODY,
        "restored by the unprivileged user"
    );
    // The seed's own example: a second key into the DIR holding the first, read-only.
    // Older than the timestamp granularity, its directories are listed ahead of the
    // update, by the unprivileged user (each is unlocked, so opened, all the same).
    std::thread::sleep(std::time::Duration::from_millis(50));
    let run = env.run_unprivileged(["dir", "download", "gomod/2", out.to_str().unwrap()]);
    run.ok();
    assert_eq!(snapshot(&out), snapshot(&v2));
    assert_eq!(leftovers_around(&out), Vec::<String>::new());

    // A broken entry leaves the read-only tree exactly as it was.
    let manifest =
        Manifest::decode("m", &stored(&format!("{}/gomod/1", env.prefix)).unwrap()).unwrap();
    let pack = format!(
        "{}/.cacher/packs/{}",
        env.prefix,
        manifest.table.packs[0].to_hex()
    );
    rt().block_on(bucket().delete(&pack)).unwrap();
    let run = env.run_unprivileged(["dir", "download", "gomod/1", out.to_str().unwrap()]);
    run.code(1);
    assert_eq!(snapshot(&out), snapshot(&v2));
    assert_eq!(leftovers_around(&out), Vec::<String>::new());
    unlock(&env.path(""));
}

#[test]
fn restores_into_a_symlinked_dir_and_under_a_read_only_parent() {
    if !can_switch_users("restores_into_a_symlinked_dir_and_under_a_read_only_parent") {
        return;
    }
    let env = TestEnv::s3("dirplaces");
    let v1 = module_cache(&env, "v1", 1);
    env.run(["dir", "upload", "k", v1.to_str().unwrap()]).ok();

    // DIR is a symlink to a directory: the restore lands in the target.
    let work = env.path("work");
    std::fs::create_dir_all(work.join("real")).unwrap();
    std::os::unix::fs::symlink("real", work.join("link")).unwrap();
    env.give_to_nobody(&work);
    env.run_unprivileged(["dir", "download", "k", work.join("link").to_str().unwrap()])
        .ok();
    assert!(
        std::fs::symlink_metadata(work.join("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(snapshot(&work.join("real")), snapshot(&v1));

    // DIR's parent is not writable by the user: the temp tree is built inside DIR.
    let locked = env.path("locked");
    std::fs::create_dir_all(locked.join("mod")).unwrap();
    env.give_to_nobody(&locked);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let run = env.run_unprivileged(["dir", "download", "k", locked.join("mod").to_str().unwrap()]);
    run.ok();
    assert_eq!(snapshot(&locked.join("mod")), snapshot(&v1));
    assert_eq!(leftovers_around(&locked.join("mod")), Vec::<String>::new());
    unlock(&env.path(""));
}

/// A tmpfs of `size` mounted at `at` for the length of a test (root only).
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn restores_into_a_mount_point_and_a_failed_swap_puts_dir_back() {
    if !can_switch_users("restores_into_a_mount_point_and_a_failed_swap_puts_dir_back") {
        return;
    }
    let env = TestEnv::s3("mountpoint");
    let v1 = module_cache(&env, "v1", 1);
    let v2 = module_cache(&env, "v2", 2);
    env.run(["dir", "upload", "k1", v1.to_str().unwrap()]).ok();
    env.run(["dir", "upload", "k2", v2.to_str().unwrap()]).ok();

    // DIR is a mount point (a cache volume): it cannot be renamed or removed.
    let mnt = env.path("mnt");
    let _mount = Mount::tmpfs(&mnt, "64m");
    env.give_to_nobody(&mnt);
    env.run_unprivileged(["dir", "download", "k1", mnt.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&mnt), snapshot(&v1));

    // A top-level entry that is a mount point (a cache volume inside DIR): an update
    // in place works inside it, and removes what the entry lacks.
    let out = env.path("out");
    env.run(["dir", "download", "k1", out.to_str().unwrap()])
        .ok();
    let inner = out.join("github.com");
    sh(&format!("chmod u+w '{}'", inner.display()), env.dir.path());
    let _inner_mount = Mount::tmpfs(&inner, "1m");
    std::fs::write(inner.join("kept"), "inner").unwrap();
    env.run(["dir", "download", "k2", out.to_str().unwrap()])
        .ok();
    assert_eq!(snapshot(&out), snapshot(&v2));

    // Without a tree state, and holding far more than the entry (a 100 MiB sparse
    // file), DIR is not read: the tree is built whole and swapped in, and a mount point
    // cannot be moved. The swap fails part way and DIR is put back exactly as it was,
    // nothing half-deleted.
    std::fs::remove_dir_all(env.home().join(".local/state/cacher")).unwrap();
    std::fs::File::create(out.join("big.sparse"))
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let before = snapshot(&out);
    let run = env.run(["dir", "download", "k1", out.to_str().unwrap()]);
    run.code(2);
    assert!(run.stderr.contains("left as it was"), "{}", run.stderr);
    assert_eq!(snapshot(&out), before, "DIR as it was");
    assert_eq!(leftovers_around(&out), Vec::<String>::new());
    drop(_inner_mount);
    unlock(&env.path(""));
}

#[test]
fn setuid_setgid_and_sticky_bits_are_not_restored() {
    let env = TestEnv::s3("modes");
    let src = env.path("src");
    let tool = env.write("src/bin/tool", "#!/bin/sh\n");
    let shared = env.write("src/bin/shared", "x");
    std::fs::create_dir(src.join("tmp")).unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o2755)).unwrap();
    std::fs::set_permissions(src.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    env.run(["dir", "upload", "k", src.to_str().unwrap()]).ok();
    sh(
        &format!(
            "tar -C '{}' -cf - . | zstd -q > legacy.tar.zst",
            src.display()
        ),
        env.dir.path(),
    );
    env.run([
        "upload",
        "legacy.tar.zst",
        env.path("legacy.tar.zst").to_str().unwrap(),
    ])
    .ok();
    for key in ["k", "legacy.tar.zst"] {
        let out = env.path(&format!("out-{key}"));
        env.run(["dir", "download", key, out.to_str().unwrap()])
            .ok();
        let mode = |p: &str| std::fs::metadata(out.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("bin/tool"), 0o755, "{key}");
        assert_eq!(mode("bin/shared"), 0o755, "{key}");
        assert_eq!(mode("tmp"), 0o777, "{key}");
    }
}

/// The first chunk of the entry `key` and a manifest that repeats it `times` in one
/// file: a few KB declaring `times` x 64 KiB.
fn repeating_manifest(env: &TestEnv, key: &str, times: usize) -> Vec<u8> {
    let mut m = Manifest::decode("m", &stored(&format!("{}/{key}", env.prefix)).unwrap()).unwrap();
    let chunk = m.table.chunks[0];
    m.table.chunks = vec![chunk; times];
    m.stream_len = u64::from(chunk.len) * times as u64;
    m.entries = vec![Entry {
        path: b"huge".to_vec(),
        kind: EntryKind::File { size: m.stream_len },
        mode: 0o644,
        mtime: 0,
        mtime_nsec: 0,
    }];
    m.encode()
}

#[test]
fn a_restore_larger_than_the_free_space_is_refused_before_writing() {
    if !can_switch_users("a_restore_larger_than_the_free_space_is_refused_before_writing") {
        return; // mounting the small filesystem needs root
    }
    let env = TestEnv::s3("nospace");
    env.write("src/blob", random_bytes(300_000, 5));
    env.run(["dir", "upload", "k", env.path("src").to_str().unwrap()])
        .ok();
    let crafted = repeating_manifest(&env, "k", 400);
    assert!(crafted.len() < 20_000, "a small object: {}", crafted.len());
    put_object(&format!("{}/big", env.prefix), crafted);

    let small = env.path("small");
    let _mount = Mount::tmpfs(&small, "8m");
    std::fs::write(small.join("precious"), "keep").unwrap();
    let run = env.run(["dir", "download", "big", small.to_str().unwrap()]);
    run.code(2);
    assert!(run.stderr.contains("free"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    let names: Vec<_> = std::fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["precious"], "nothing written");
}

#[test]
fn errors_quote_hostile_paths_briefly() {
    let env = TestEnv::s3("longpath");
    let name = vec![b'n'; 4000];
    let m = Manifest {
        kind: cacher::chunk::format::ManifestKind::Dir,
        created: 0,
        label: String::new(),
        stream_len: 0,
        table: Default::default(),
        entries: vec![Entry {
            path: name,
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime: 0,
            mtime_nsec: 0,
        }],
    };
    put_object(&format!("{}/long", env.prefix), m.encode());
    let out = env.path("out");
    let run = env.run(["dir", "download", "long", out.to_str().unwrap()]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.len() < 500, "{}", run.stderr);
    assert!(run.stderr.contains("4000 bytes"), "{}", run.stderr);
    assert!(!out.exists(), "nothing left");
}

#[test]
fn sigterm_during_a_restore_exits_143_and_leaves_dir_untouched() {
    let mut env = TestEnv::s3("sigterm");
    for i in 0..6 {
        env.write(&format!("src/f{i}"), random_bytes(2 * 1024 * 1024, 70 + i));
    }
    // Small files (written by the writer threads) before and after the large ones.
    for i in 0..200 {
        let dir = if i % 2 == 0 { "a" } else { "g" };
        env.write(
            &format!("src/{dir}{}/s{i}", i % 20),
            random_bytes(3000, 100 + i),
        );
    }
    env.run(["dir", "upload", "k", env.path("src").to_str().unwrap()])
        .ok();
    let proxy = Proxy::start(&server().endpoint);
    env.set("CACHER_ENDPOINT", &proxy.endpoint);
    proxy.plan(&[Fault::Trickle(20); 64]);
    let out = env.path("out");
    env.write("out/precious", "keep me");
    let before = snapshot(&out);
    let child = env
        .cmd(["dir", "download", "k", out.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = child.wait_with_output().unwrap();
    assert_eq!(
        done.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(snapshot(&out), before, "DIR untouched");
    assert_eq!(leftovers_around(&out), Vec::<String>::new());
}

/// The case-insensitive filesystem of tests/util/casefold_fs.py (FUSE) mounted over a
/// backing dir for the length of a test; `None` (and SKIPPED) where it cannot run.
struct CaseFold {
    mount: PathBuf,
    child: std::process::Child,
}

impl CaseFold {
    fn mount(env: &TestEnv, test: &str) -> Option<CaseFold> {
        let python_fuse = Command::new("python3")
            .args(["-c", "import fuse"])
            .status()
            .is_ok_and(|s| s.success());
        if !can_switch_users(test) || !Path::new("/dev/fuse").exists() || !python_fuse {
            eprintln!("SKIPPED {test}: needs root, /dev/fuse and python3's fusepy");
            return None;
        }
        let (backing, mount) = (env.path("backing"), env.path("ci"));
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/casefold_fs.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(&backing)
            .arg(&mount)
            .spawn()
            .unwrap();
        let fs = CaseFold { mount, child };
        for _ in 0..100 {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
            if mounts.contains(fs.mount.to_str().unwrap()) {
                return Some(fs);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the case-folding filesystem did not mount");
    }
}

impl Drop for CaseFold {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn on_a_case_insensitive_filesystem_names_differing_in_case_never_alias() {
    let env = TestEnv::s3("casefold");
    let Some(fs) = CaseFold::mount(
        &env,
        "on_a_case_insensitive_filesystem_names_differing_in_case_never_alias",
    ) else {
        return;
    };
    // The filesystem really folds case.
    std::fs::write(fs.mount.join("Probe"), "p").unwrap();
    assert!(fs.mount.join("probe").exists(), "case-insensitive lookups");
    std::fs::remove_file(fs.mount.join("Probe")).unwrap();

    // A crafted entry: `d/X` a symlink to a file outside, then `d/x` a file.
    let outside = env.write("outside/target", "do not touch");
    env.write("src/d/x", "payload");
    env.run(["dir", "upload", "honest", env.path("src").to_str().unwrap()])
        .ok();
    let mut m = Manifest::decode("m", &stored(&format!("{}/honest", env.prefix)).unwrap()).unwrap();
    let link = Entry {
        path: b"d/X".to_vec(),
        kind: EntryKind::Symlink {
            target: outside.as_os_str().as_encoded_bytes().to_vec(),
        },
        mode: 0o777,
        mtime: 0,
        mtime_nsec: 0,
    };
    m.entries.insert(1, link);
    put_object(&format!("{}/crafted", env.prefix), m.encode());
    let dir = fs.mount.join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("precious"), "keep").unwrap();
    let before = snapshot(&dir);
    let run = env.run(["dir", "download", "crafted", dir.to_str().unwrap()]);
    run.code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_eq!(std::fs::read(&outside).unwrap(), b"do not touch");
    assert_eq!(snapshot(&dir), before, "DIR untouched");
    assert_eq!(leftovers_around(&dir), Vec::<String>::new());

    // An honest tree with both Makefile and makefile: an error naming them.
    env.write("both/Makefile", "all:\n");
    env.write("both/makefile", "other:\n");
    env.run(["dir", "upload", "both", env.path("both").to_str().unwrap()])
        .ok();
    let run = env.run(["dir", "download", "both", dir.to_str().unwrap()]);
    run.code(2);
    assert!(
        run.stderr.contains("`Makefile`") && run.stderr.contains("`makefile`"),
        "{}",
        run.stderr
    );
    assert_eq!(snapshot(&dir), before, "DIR untouched");

    // An ordinary tree restores fine there.
    env.run(["dir", "download", "honest", dir.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read(dir.join("d/x")).unwrap(), b"payload");
    assert!(dir.join("precious").exists());

    // Over a tree holding `docs/notes.txt`, an entry's `docs/Notes.txt` is that file:
    // updated in place, not removed as a name the entry lacks; `docs/stray` is one.
    env.write("cased/docs/Notes.txt", "new notes");
    env.run([
        "dir",
        "upload",
        "cased",
        env.path("cased").to_str().unwrap(),
    ])
    .ok();
    let over = fs.mount.join("over");
    std::fs::create_dir_all(over.join("docs")).unwrap();
    std::fs::write(over.join("docs/notes.txt"), "old notes, longer").unwrap();
    std::fs::write(over.join("docs/stray"), "stale").unwrap();
    for delete in [false, true] {
        let mut args = vec!["-v", "dir", "download", "cased", over.to_str().unwrap()];
        args.extend(delete.then_some("--delete"));
        let run = env.run(args);
        assert!(
            run.ok().stderr.contains("files of"),
            "in place: {}",
            run.stderr
        );
        let names: Vec<_> = std::fs::read_dir(over.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_ascii_lowercase())
            .collect();
        assert_eq!(names, ["notes.txt"], "delete: {delete}");
        assert_eq!(
            std::fs::read(over.join("docs/Notes.txt")).unwrap(),
            b"new notes"
        );
    }
}

/// Small files are written on several threads, and each directory waits, holding a
/// handle, until the files in it are written before its times are set. A tree of many
/// directories of one or two files each restores exactly (directory times too) with
/// the 256 handles macOS gives a process by default; 128 here, with room for sockets.
#[test]
fn many_small_directories_restore_exactly_within_a_small_handle_limit() {
    let env = TestEnv::s3("handles");
    for d in 0..400 {
        env.write(&format!("src/d{d:03}/f"), format!("file {d}"));
        if d % 3 == 0 {
            env.write(&format!("src/d{d:03}/sub/g"), random_bytes(3000, d as u64));
        }
    }
    let src = env.path("src");
    sh(
        &format!(
            "find '{}' -exec touch -h -d '2021-02-03 04:05:06.789' {{}} +",
            src.display()
        ),
        env.dir.path(),
    );
    env.run(["dir", "upload", "many", src.to_str().unwrap()])
        .ok();
    let out = env.path("out");
    let mut cmd = env.cmd(["dir", "download", "many", out.to_str().unwrap()]);
    crate::util::limit_open_files(&mut cmd, 128);
    let run = crate::util::Run::of(cmd.output().expect("run cacher"));
    run.ok();
    assert_eq!(snapshot(&out), snapshot(&src));
}
