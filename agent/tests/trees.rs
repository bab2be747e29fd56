//! Folders and many files, end to end: the real `broker` and `agent` binaries
//! on 127.0.0.1. A nested tree (empty directories and files, spaces and
//! non-ASCII in names) arrives identical, and private with `--no-preserve`
//! (files 0600, directories 0700; `kept.rs` has the sender's modes); several `--file` items arrive as several items; an existing
//! directory is never touched; symbolic links below a directory are never
//! followed; `--exclude` leaves things out; and single files of the sizes
//! around a chunk boundary, and a large one spanning many session keys,
//! arrive byte for byte.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{
    Broker, Home, Run, TempDir, WAIT, finals, json, names_in, pseudo_random, sha256_hex,
};

/// One data chunk of the stream.
const CHUNK: usize = 512 << 10;

/// What a path below a tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Link,
    Other,
}

/// Everything below `root` (not `root` itself), by path relative to it,
/// never following a link.
fn walk(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let ft = m.file_type();
            if ft.is_symlink() {
                out.insert(rel, Node::Link);
            } else if ft.is_dir() {
                out.insert(rel, Node::Dir);
                go(root, &p, out);
            } else if ft.is_file() {
                out.insert(rel, Node::File(std::fs::read(&p).unwrap()));
            } else {
                out.insert(rel, Node::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// The two trees are the same: `diff -r` agrees, and so does a walk of both
/// (which also sees empty directories, that `diff -r` alone does not compare
/// by content).
fn assert_same_tree(src: &Path, dst: &Path) {
    let diff = std::process::Command::new("diff")
        .arg("-r")
        .arg(src)
        .arg(dst)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "diff -r {} {}:\n{}{}",
        src.display(),
        dst.display(),
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    let (a, b) = (walk(src), walk(dst));
    let names = |t: &BTreeMap<PathBuf, Node>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "the trees list different entries");
    assert!(a == b, "same names, different content");
}

/// Every file below (and at) `root` is 0600, every directory 0700 (what a
/// receiver with `--no-preserve` makes).
fn assert_private(root: &Path) {
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let top = std::fs::symlink_metadata(root).unwrap();
    let want = if top.is_dir() { 0o700 } else { 0o600 };
    assert_eq!(mode(root), want, "{}", root.display());
    if !top.is_dir() {
        return;
    }
    for (rel, node) in walk(root) {
        let p = root.join(&rel);
        match node {
            Node::Dir => assert_eq!(mode(&p), 0o700, "{}: {:o}", p.display(), mode(&p)),
            Node::File(_) => assert_eq!(mode(&p), 0o600, "{}: {:o}", p.display(), mode(&p)),
            other => panic!("{} is {other:?}", p.display()),
        }
    }
}

/// Sends `paths` (each a `--file`) from `from` to bob with `--json` and `extra`.
fn send(from: &Home, broker: &Broker, paths: &[&Path], extra: &[&str]) -> Run {
    let mut args: Vec<String> = ["--role", "sender", "--to", "bob", "--json"]
        .map(String::from)
        .to_vec();
    for p in paths {
        args.push("--file".into());
        args.push(p.to_str().unwrap().to_owned());
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    from.run(broker, &args)
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_nested_tree_arrives_identical_and_private() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let root = src.join("project");
    // Three levels of directories, files that span chunks and files that
    // share one, an empty file, an empty directory, names with spaces,
    // non-ASCII and a leading dot (kept below a top-level item).
    write(&root.join("README.md"), b"# project\n");
    write(&root.join("naïve ☃.md"), "snow ☃ and naïveté\n".as_bytes());
    write(&root.join("with space.txt"), b"spaces are fine\n");
    write(&root.join("empty.txt"), b"");
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    write(&root.join("a/mid.bin"), &pseudo_random(700 << 10, 1));
    write(&root.join("a/b/.hidden"), b"kept as it is, below the top");
    write(
        &root.join("a/b/c/deep.bin"),
        &pseudo_random(3 * CHUNK / 2, 2),
    );
    write(&root.join("a/b/c/tiny"), b"x");
    write(&root.join("a/b/c/also empty"), b"");
    std::fs::create_dir_all(root.join("a/b/c/Ünïcödé dïr/日本語")).unwrap();
    write(
        &root.join("a/b/c/Ünïcödé dïr/日本語/ファイル.txt"),
        "こんにちは\n".as_bytes(),
    );
    write(&root.join("z/last.bin"), &pseudo_random(CHUNK, 3));
    // Modes at the source are not carried: the receiver's are private.
    chmod(&root.join("README.md"), 0o644);
    chmod(&root.join("a/mid.bin"), 0o755);
    chmod(&root.join("a"), 0o755);
    chmod(&root.join("empty dir"), 0o775);
    let tree = walk(&root);
    let files = tree.values().filter(|n| matches!(n, Node::File(_))).count();
    let bytes: usize = tree
        .values()
        .map(|n| match n {
            Node::File(d) => d.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(files, 11);

    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--no-preserve"]);
    let sent = send(&alice, &broker, &[&root], &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!(report["file"], "project");
    assert_eq!(report["files"], files as u64, "{report}");
    assert_eq!(report["bytes"], bytes as u64, "{report}");
    assert_eq!(report["resumed_from"], 0);
    assert_eq!(report["attempts"], 1);
    assert_eq!(
        receiver.wait(WAIT),
        Some(0),
        "{:#?}",
        receiver.stderr.drain()
    );
    let line = receiver.stdout.wait_for("received", WAIT);
    assert!(
        line.contains(&format!("1 item(s), {files} file(s)"))
            && line.contains(report["sha256"].as_str().unwrap())
            && line.contains(&format!("-> {}", out.join("project").display())),
        "{line}"
    );

    let dst = out.join("project");
    assert_same_tree(&root, &dst);
    assert_private(&dst);
    // Nothing else in the out dir: no staging directory left behind.
    assert_eq!(names_in(out.path()), ["project"]);
}

#[test]
fn a_file_and_a_directory_arrive_as_two_items_and_only_files_count() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    write(&src.join("notes.txt"), b"see the photos\n");
    let photos = src.join("photos");
    write(&photos.join("one.jpg"), &pseudo_random(100_000, 4));
    write(&photos.join("two.jpg"), &pseudo_random(CHUNK + 1, 5));
    write(&photos.join("raw/three.cr2"), &pseudo_random(20_000, 6));
    std::fs::create_dir_all(photos.join("raw/empty")).unwrap();

    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--no-preserve"]);
    // A trailing slash names the same directory.
    let with_slash = PathBuf::from(format!("{}/", photos.display()));
    let sent = send(&alice, &broker, &[&src.join("notes.txt"), &with_slash], &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    // 1 + 3 files; the directories photos, photos/raw and photos/raw/empty
    // are not counted.
    assert_eq!(report["files"], 4, "{report}");
    assert_eq!(report["file"], "notes.txt", "the first item's name");
    assert_eq!(
        report["bytes"],
        (15 + 100_000 + CHUNK + 1 + 20_000) as u64,
        "{report}"
    );
    assert_eq!(receiver.wait(WAIT), Some(0));
    let line = receiver.stdout.wait_for("received", WAIT);
    assert!(
        line.contains("2 item(s), 4 file(s)")
            && line.contains(&format!(
                "-> {}, {}",
                out.join("notes.txt").display(),
                out.join("photos").display()
            )),
        "{line}"
    );
    assert_eq!(finals(out.path()), ["notes.txt", "photos"]);
    assert_eq!(names_in(out.path()), ["notes.txt", "photos"]);
    assert_eq!(
        std::fs::read(out.join("notes.txt")).unwrap(),
        b"see the photos\n"
    );
    assert_same_tree(&photos, &out.join("photos"));
    assert_private(&out.join("notes.txt"));
    assert_private(&out.join("photos"));
}

#[test]
fn an_existing_directory_is_left_alone_and_the_new_one_lands_beside_it() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    // bob's own photos, with a file of the same name as one that comes.
    let mine = out.join("photos");
    write(&mine.join("one.jpg"), b"precious");
    write(&mine.join("album/cover.jpg"), b"mine too");
    chmod(&mine, 0o755);
    let before = walk(&mine);

    let photos = src.join("photos");
    write(&photos.join("one.jpg"), b"new version");
    write(&photos.join("two.jpg"), &pseudo_random(50_000, 7));
    let _receiver = bob.receiver(&broker, out.path(), &["--no-preserve"]);
    for expect in ["photos (1)", "photos (2)"] {
        let sent = send(&alice, &broker, &[&photos], &[]);
        assert_eq!(sent.code, Some(0), "{sent:#?}");
        assert_eq!(json(&sent)["files"], 2);
        assert_same_tree(&photos, &out.join(expect));
        assert_private(&out.join(expect));
    }
    // bob's directory: same entries, same content, same mode.
    assert_eq!(walk(&mine), before);
    assert_eq!(
        std::fs::metadata(&mine).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(names_in(out.path()), ["photos", "photos (1)", "photos (2)"]);
}

#[test]
fn a_symbolic_link_inside_a_tree_is_never_followed() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out, outside) = (
        TempDir::new("src"),
        TempDir::new("out"),
        TempDir::new("outside"),
    );
    write(&outside.join("secret.txt"), b"TOP SECRET outside the tree");
    write(&outside.join("dir/also-secret.txt"), b"TOP SECRET as well");
    let tree = src.join("tree");
    write(&tree.join("ok.txt"), b"this one is sent");
    std::os::unix::fs::symlink(outside.join("secret.txt"), tree.join("link.txt")).unwrap();
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("dir"), tree.join("sub/dirlink")).unwrap();
    // A dangling link and one pointing inside the tree are links all the same.
    std::os::unix::fs::symlink("/nonexistent/keyferry", tree.join("dangling")).unwrap();
    std::os::unix::fs::symlink("ok.txt", tree.join("sub/inside")).unwrap();

    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let sent = send(&alice, &broker, &[&tree], &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["files"], 1, "{sent:#?}");
    for link in ["link.txt", "sub/dirlink", "dangling", "sub/inside"] {
        let p = tree.join(link);
        assert!(
            sent.stderr.lines().any(|l| l.contains("skipping")
                && l.contains(&p.display().to_string())
                && l.contains("a symbolic link")),
            "no warning for {}: {}",
            p.display(),
            sent.stderr
        );
    }
    receiver.stdout.wait_for("received", WAIT);
    let got = walk(&out.join("tree"));
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        [PathBuf::from("ok.txt"), PathBuf::from("sub")],
        "{got:?}"
    );
    assert_eq!(
        got[Path::new("ok.txt")],
        Node::File(b"this one is sent".to_vec())
    );
    // Nothing of what the links point to arrived, under any name.
    for node in walk(out.path()).values() {
        if let Node::File(d) = node {
            assert!(!d.windows(10).any(|w| w == b"TOP SECRET"), "{d:?}");
        }
    }

    // --no-skip-links: refused before anything is sent. A fresh sender
    // (carol) would print NEW KEY for the broker had it connected at all.
    let carol = Home::new("carol", "carol");
    let seen = (receiver.stdout.drain().len(), receiver.stderr.drain().len());
    let refused = send(&carol, &broker, &[&tree], &["--no-skip-links"]);
    assert_eq!(refused.code, Some(7), "{refused:#?}");
    assert!(
        refused.stderr.contains("a symbolic link")
            && refused.stderr.contains("--no-skip-links")
            && refused.stderr.contains(&tree.display().to_string()),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains("NEW KEY"), "{}", refused.stderr);
    assert!(refused.stdout.is_empty(), "{refused:#?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (receiver.stdout.drain().len(), receiver.stderr.drain().len()),
        seen,
        "the receiver heard of it: {:#?} {:#?}",
        receiver.stdout.seen,
        receiver.stderr.seen
    );
    assert_eq!(names_in(out.path()), ["tree"]);
    // The same with a link alone in a directory given as --file: the link
    // in it is refused too.
    let only = src.join("only-link");
    std::fs::create_dir(&only).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), only.join("s")).unwrap();
    let refused = send(&carol, &broker, &[&only], &["--no-skip-links"]);
    assert_eq!(refused.code, Some(7), "{refused:#?}");
    assert_eq!(names_in(out.path()), ["tree"]);
}

#[test]
fn excluded_names_and_paths_are_left_out() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let dir = src.join("dir");
    write(&dir.join("a.txt"), b"a");
    write(&dir.join("a.log"), b"log at the top");
    write(&dir.join("sub/x.txt"), b"in the excluded directory");
    write(&dir.join("sub/deeper/y.txt"), b"deeper in it");
    write(&dir.join("keep/sub/z.txt"), b"another sub: not dir/sub");
    write(&dir.join("keep/deep/er/n.log"), b"a log three levels down");
    write(&dir.join("keep/notes.log.txt"), b"not a .log");
    write(&dir.join("subway.txt"), b"not dir/sub either");

    let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
    let sent = send(
        &alice,
        &broker,
        &[&dir],
        &["--exclude", "*.log", "--exclude", "dir/sub"],
    );
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["files"], 4, "{sent:#?}");
    assert_eq!(receiver.wait(WAIT), Some(0));
    let got: Vec<String> = walk(&out.join("dir"))
        .into_iter()
        .map(|(p, n)| format!("{}{}", p.display(), if n == Node::Dir { "/" } else { "" }))
        .collect();
    assert_eq!(
        got,
        [
            "a.txt",
            "keep/",
            "keep/deep/",
            "keep/deep/er/",
            "keep/notes.log.txt",
            "keep/sub/",
            "keep/sub/z.txt",
            "subway.txt",
        ],
    );
    assert_eq!(
        std::fs::read(out.join("dir/keep/sub/z.txt")).unwrap(),
        b"another sub: not dir/sub"
    );
}

#[test]
fn an_empty_directory_alone_arrives_and_counts_no_files() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    std::fs::create_dir_all(src.join("nothing here/nor here")).unwrap();
    let mut receiver = bob.receiver(&broker, out.path(), &["--once", "--no-preserve"]);
    let sent = send(&alice, &broker, &[&src.join("nothing here")], &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    assert_eq!((&report["files"], &report["bytes"]), (&0.into(), &0.into()));
    assert_eq!(receiver.wait(WAIT), Some(0));
    assert_same_tree(&src.join("nothing here"), &out.join("nothing here"));
    assert_private(&out.join("nothing here"));
    assert_eq!(names_in(out.path()), ["nothing here"]);
}

#[test]
fn five_thousand_small_files_in_twenty_directories_arrive() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let many = src.join("many");
    for d in 0..20 {
        std::fs::create_dir_all(many.join(format!("d{d}"))).unwrap();
        for f in 0..250 {
            let body = format!("{d} {f}\n").repeat(f % 7);
            std::fs::write(many.join(format!("d{d}/f{f}.txt")), body).unwrap();
        }
    }
    // The receiver may hold only 256 open files: a tree of 5,000 must never
    // need one descriptor per file at once (to sync them, say).
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(support::agent_bin())
        .args(["--broker", &broker.addr, "--name", "bob", "--home"])
        .arg(bob.dir.path())
        .args(["--role", "receiver", "--once", "--out-dir"])
        .arg(out.path());
    let mut receiver = support::Proc::spawn(cmd);
    receiver.stdout.wait_for("receiving as", WAIT);
    let sent = send(&alice, &broker, &[&many], &[]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    assert_eq!(json(&sent)["files"], 5000);
    assert_eq!(receiver.wait(WAIT), Some(0));
    receiver
        .stdout
        .wait_for("received 1 item(s), 5000 file(s)", WAIT);
    assert_same_tree(&many, &out.join("many"));
    assert_eq!(names_in(out.path()), ["many"]);
}

#[test]
fn more_entries_than_one_transfer_carries_are_refused_before_anything_is_sent() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    // 10,000 files and their directory: 10,001 entries.
    let big = src.join("big");
    std::fs::create_dir(&big).unwrap();
    for f in 0..10_000 {
        std::fs::write(big.join(format!("{f}")), b"").unwrap();
    }
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let seen = receiver.stderr.drain().len();
    let sent = send(&alice, &broker, &[&big], &[]);
    // A usage error found after parsing exits 2, as clap's own do.
    assert_eq!(sent.code, Some(2), "{sent:#?}");
    assert!(sent.stderr.contains("at most 10000"), "{}", sent.stderr);
    assert!(!sent.stderr.contains("NEW KEY"), "{}", sent.stderr);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(receiver.stderr.drain().len(), seen);
    assert!(names_in(out.path()).is_empty());
}

#[test]
fn an_exclude_that_leaves_nothing_to_send_is_refused_before_anything_is_sent() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    write(&src.join("dir/a.log"), b"only logs");
    let mut receiver = bob.receiver(&broker, out.path(), &[]);
    let seen = receiver.stderr.drain().len();
    // The item itself is excluded: nothing is left to send.
    let sent = send(&alice, &broker, &[&src.join("dir")], &["--exclude", "dir"]);
    assert!(matches!(sent.code, Some(c) if c != 0), "{sent:#?}");
    std::thread::sleep(Duration::from_millis(300));
    let heard: Vec<String> = receiver.stderr.drain()[seen..].to_vec();
    assert!(
        heard.is_empty(),
        "an empty transfer reached the receiver (which spent an RSA decryption on it); \
         the sender said {:?}; the receiver said {heard:#?}",
        sent.stderr
    );
    assert!(names_in(out.path()).is_empty());
}

#[test]
fn single_files_of_zero_one_and_about_one_chunk_arrive_intact() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    support::known_for_two_days(&alice, &bob);
    let mut receiver = bob.receiver(&broker, out.path(), &["--no-preserve"]);
    for (i, size) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK]
        .into_iter()
        .enumerate()
    {
        let name = format!("size-{size}.bin");
        let data = pseudo_random(size, 100 + i as u64);
        write(&src.join(&name), &data);
        let sent = send(&alice, &broker, &[&src.join(&name)], &[]);
        assert_eq!(sent.code, Some(0), "{size} bytes: {sent:#?}");
        let report = json(&sent);
        assert_eq!(report["file"], name.as_str());
        assert_eq!(report["files"], 1);
        assert_eq!(report["bytes"], size as u64);
        assert_eq!(report["sha256"], sha256_hex(&data), "{size} bytes");
        assert_eq!(report["session_keys"], 1);
        assert_eq!(report["attempts"], 1);
        let line = receiver.stdout.wait_for(&format!("received {name} "), WAIT);
        assert!(
            line.contains(&format!("({size} bytes, sha256 {}", sha256_hex(&data))),
            "{line}"
        );
        let got = std::fs::read(out.join(&name)).unwrap();
        assert!(got == data, "{size} bytes: {} arrived", got.len());
        assert_private(&out.join(&name));
    }
    assert_eq!(finals(out.path()).len(), 6);
    assert_eq!(names_in(out.path()).len(), 6);
}

#[test]
fn a_256_mib_file_with_a_50ms_rekey_spans_several_session_keys() {
    let broker = Broker::start();
    let (alice, bob) = (Home::new("alice", "alice"), Home::new("bob", "bob"));
    let (src, out) = (TempDir::new("src"), TempDir::new("out"));
    let data = pseudo_random(256 << 20, 9);
    let sha = sha256_hex(&data);
    let file = src.join("big.bin");
    std::fs::write(&file, &data).unwrap();
    drop(data);
    let mut receiver = bob.receiver(&broker, out.path(), &["--once"]);
    let sent = send(&alice, &broker, &[&file], &["--rekey-interval", "50ms"]);
    assert_eq!(sent.code, Some(0), "{sent:#?}");
    let report = json(&sent);
    let keys = report["session_keys"].as_u64().unwrap();
    let seconds = report["seconds"].as_f64().unwrap();
    println!("256 MiB: {keys} session keys in {seconds:.3} s");
    assert!(keys > 1, "{report}");
    assert!(
        keys <= (seconds / 0.050).floor() as u64 + 1,
        "{keys} keys in {seconds:.3} s with a 50 ms rekey: {report}"
    );
    assert_eq!(report["bytes"], 256u64 << 20);
    assert_eq!(report["sha256"], sha.as_str());
    assert_eq!(receiver.wait(WAIT), Some(0));
    let got = std::fs::read(out.join("big.bin")).unwrap();
    assert_eq!(got.len(), 256 << 20);
    assert_eq!(sha256_hex(&got), sha);
    assert_eq!(names_in(out.path()), ["big.bin"]);
}
