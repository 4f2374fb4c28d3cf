// Tests may unwrap: a panic is exactly how a failed setup step should report itself here.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;

// ---------------------------------------------------------------- fault injection hooks

#[derive(Debug, Clone, Copy)]
pub(crate) enum WriteFault {
    /// The write fails before any byte reaches the file.
    Nothing,
    /// Half of the record reaches the file, then the write fails.
    Half,
}

pub(crate) fn inject_write_fault(
    fault: WriteFault,
    log: &mut File,
    record: &[u8],
) -> io::Result<()> {
    if let WriteFault::Half = fault {
        log.write_all(&record[..record.len() / 2])?;
        log.sync_data()?;
    }
    Err(io::Error::other("injected write failure"))
}

// ---------------------------------------------------------------- toy state machine

/// key -> owner; `applied` counts applied ops so a double replay would be visible.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bindings {
    owners: BTreeMap<String, String>,
    applied: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum ToyOp {
    Bind { key: String, owner: String },
    Unbind { key: String },
}

impl StateMachine for Bindings {
    type Op = ToyOp;
    fn apply(&mut self, op: &ToyOp) -> Result<(), String> {
        match op {
            ToyOp::Bind { key, owner } => {
                if let Some(cur) = self.owners.get(key)
                    && cur != owner
                {
                    return Err(format!("{key} is bound to {cur}"));
                }
                self.owners.insert(key.clone(), owner.clone());
            }
            ToyOp::Unbind { key } => {
                self.owners.remove(key);
            }
        }
        self.applied += 1;
        Ok(())
    }
}

fn bind(key: &str, owner: &str) -> ToyOp {
    ToyOp::Bind {
        key: key.into(),
        owner: owner.into(),
    }
}

fn unbind(key: &str) -> ToyOp {
    ToyOp::Unbind { key: key.into() }
}

type Toy = Store<Bindings>;

fn no_compact() -> Options {
    Options {
        compact_after_bytes: u64::MAX,
        sync: true,
        on_flush: None,
        faults: None,
    }
}

fn open(dir: &Path) -> Toy {
    Toy::open_with(dir, no_compact()).unwrap()
}

fn files(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The single `wal-*.log` in `dir`.
fn wal(dir: &Path) -> PathBuf {
    let logs: Vec<_> = files(dir)
        .into_iter()
        .filter(|n| parse_log_name(n).is_some())
        .collect();
    assert_eq!(
        logs.len(),
        1,
        "expected one log in {}: {logs:?}",
        dir.display()
    );
    dir.join(&logs[0])
}

fn copy_dir(src: &Path, dst: &Path) {
    for name in files(src) {
        if name != LOCK_FILE {
            fs::copy(src.join(&name), dst.join(&name)).unwrap();
        }
    }
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut rec = (payload.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    rec.extend_from_slice(payload);
    rec
}

fn batches() -> Vec<Vec<ToyOp>> {
    vec![
        vec![bind("a", "x")],
        vec![bind("b", "y"), bind("c", "y"), bind("a", "z")], // last one rejected
        vec![unbind("a"), bind("a", "z")],
        vec![bind("d", "long-owner-name-to-vary-record-size")],
        vec![unbind("b"), unbind("c"), bind("b", "x"), bind("e", "x")],
    ]
}

/// Commits each batch, returning the state and log length after every prefix (index 0 = before).
fn commit_all(store: &mut Toy, batches: Vec<Vec<ToyOp>>) -> (Vec<Bindings>, Vec<u64>) {
    let log_len = |s: &Toy| {
        fs::metadata(s.dir().join(log_name(s.generation)))
            .unwrap()
            .len()
    };
    let mut states = vec![store.state().clone()];
    let mut bounds = vec![log_len(store)];
    for b in batches {
        store.commit(b).unwrap();
        states.push(store.state().clone());
        bounds.push(log_len(store));
    }
    (states, bounds)
}

// ---------------------------------------------------------------- basic behaviour

#[test]
fn commit_then_reopen_restores_state() {
    let dir = tempfile::tempdir().unwrap();
    let expected = {
        let mut s = open(dir.path());
        assert_eq!(*s.recovery(), Recovery::default());
        for b in batches() {
            s.commit(b).unwrap();
        }
        s.state().clone()
    };
    let s = open(dir.path());
    assert_eq!(*s.state(), expected);
    assert_eq!(
        *s.recovery(),
        Recovery {
            replayed_batches: 5,
            dropped_tail_bytes: 0,
            ..Recovery::default()
        }
    );
    assert_eq!(s.state().owners.get("a").map(String::as_str), Some("z"));
    assert_eq!(s.state().owners.get("e").map(String::as_str), Some("x"));
    assert_eq!(s.dir(), dir.path());
}

/// The injected full disk: a commit fails as ENOSPC does and writes nothing (the store is
/// poisoned), the probe fails too; with room again the probe passes and the store, read
/// again, has what was acknowledged and takes commits.
#[test]
fn an_injected_full_disk_fails_writes_and_probes_until_it_is_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(crate::Faults::default());
    let mut s = Toy::open_with(
        dir.path(),
        Options {
            faults: Some(faults.clone()),
            ..no_compact()
        },
    )
    .unwrap();
    s.commit(vec![bind("a", "x")]).unwrap();
    let len = fs::metadata(wal(dir.path())).unwrap().len();
    faults.set_no_space(true);
    let e = s.commit(vec![bind("b", "y")]).unwrap_err();
    assert!(
        e.to_string().contains("No space left on device") || format!("{e:?}").contains("28"),
        "{e:?}"
    );
    assert_eq!(
        fs::metadata(wal(dir.path())).unwrap().len(),
        len,
        "nothing written"
    );
    assert!(s.probe_writable().is_err());
    faults.set_no_space(false);
    s.probe_writable().unwrap();
    s.reopen().unwrap();
    assert_eq!(s.state().owners.get("a").map(String::as_str), Some("x"));
    assert_eq!(
        s.state().owners.get("b"),
        None,
        "the failed batch is not there"
    );
    s.commit(vec![bind("b", "y")]).unwrap();
    assert!(!files(dir.path()).contains("probe.tmp"));
}

#[test]
fn rejected_ops_are_reported_and_not_persisted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        // Each op sees the earlier ones of the same batch: the second bind of k1 is rejected.
        let rejected = s
            .commit(vec![
                bind("k1", "a"),
                bind("k1", "b"),
                bind("k2", "b"),
                bind("k1", "a"),
            ])
            .unwrap();
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].op, bind("k1", "b"));
        assert_eq!(rejected[0].reason, "k1 is bound to a");
        assert_eq!(s.state().applied, 3);
    }
    let s = open(dir.path());
    assert_eq!(s.state().owners.get("k1").map(String::as_str), Some("a"));
    assert_eq!(s.state().owners.get("k2").map(String::as_str), Some("b"));
    assert_eq!(s.state().applied, 3);
}

#[test]
fn empty_commit_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.commit(vec![bind("k", "a")]).unwrap();
    let len = fs::metadata(wal(dir.path())).unwrap().len();
    assert!(s.commit(vec![]).unwrap().is_empty());
    let rejected = s.commit(vec![bind("k", "b"), bind("k", "c")]).unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(fs::metadata(wal(dir.path())).unwrap().len(), len);
    drop(s);
    assert_eq!(open(dir.path()).recovery().replayed_batches, 1);
}

#[test]
fn second_open_fails_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let err = Toy::open(dir.path()).unwrap_err();
    match &err {
        StoreError::Locked { dir: d, pid } => {
            assert_eq!(d, dir.path());
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(err.to_string().contains(&std::process::id().to_string()));
    drop(first);
    open(dir.path());
}

#[test]
fn automatic_compaction_keeps_state_and_one_log() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        compact_after_bytes: 100,
        sync: true,
        on_flush: None,
        faults: None,
    };
    let expected = {
        let mut s = Toy::open_with(dir.path(), opts.clone()).unwrap();
        for i in 0..20 {
            s.commit(vec![
                bind(&format!("k{i}"), "o"),
                unbind(&format!("k{}", i / 2)),
            ])
            .unwrap();
            assert!(s.last_compaction_error().is_none());
        }
        assert!(
            s.generation > 1,
            "expected several compactions, generation {}",
            s.generation
        );
        s.state().clone()
    };
    let f = files(dir.path());
    assert!(f.contains(SNAPSHOT_FILE));
    assert_eq!(f.len(), 3, "{f:?}"); // lock, snapshot, one log
    wal(dir.path());
    let s = Toy::open_with(dir.path(), opts).unwrap();
    assert_eq!(*s.state(), expected);
    assert!(s.recovery().replayed_batches <= 1);
}

// ---------------------------------------------------------------- torn and corrupt logs

fn torn_tail_at_every_offset(compact_first: bool) {
    let src = tempfile::tempdir().unwrap();
    let (states, bounds) = {
        let mut s = open(src.path());
        if compact_first {
            s.commit(vec![bind("pre", "x"), bind("a", "x")]).unwrap();
            s.compact().unwrap();
        }
        commit_all(&mut s, batches())
    };
    assert_eq!(bounds[0], 0);
    let log_path = wal(src.path());
    let full = fs::metadata(&log_path).unwrap().len();
    assert_eq!(full, *bounds.last().unwrap());

    for cut in 0..=full {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let log = dir.path().join(log_path.file_name().unwrap());
        truncate(&log, cut);

        let mut s = open(dir.path());
        let k = bounds.iter().rposition(|&b| b <= cut).unwrap();
        assert_eq!(*s.state(), states[k], "cut at {cut}");
        assert_eq!(
            *s.recovery(),
            Recovery {
                replayed_batches: k as u64,
                dropped_tail_bytes: cut - bounds[k],
                ..Recovery::default()
            },
            "cut at {cut}"
        );
        assert_eq!(fs::metadata(&log).unwrap().len(), bounds[k]);

        // The store keeps working on the truncated log.
        assert!(s.commit(vec![bind("fresh", "n")]).unwrap().is_empty());
        let mut want = states[k].clone();
        want.apply(&bind("fresh", "n")).unwrap();
        drop(s);
        let s = open(dir.path());
        assert_eq!(*s.state(), want, "cut at {cut}");
        assert_eq!(s.recovery().dropped_tail_bytes, 0);
    }
}

#[test]
fn torn_tail_every_offset_yields_whole_batch_prefix() {
    torn_tail_at_every_offset(false);
}

#[test]
fn torn_tail_every_offset_after_compaction() {
    torn_tail_at_every_offset(true);
}

#[test]
fn corrupted_byte_in_last_record_drops_only_that_record() {
    let src = tempfile::tempdir().unwrap();
    let (states, bounds) = commit_all(&mut open(src.path()), batches());
    let log_path = wal(src.path());
    let bytes = fs::read(&log_path).unwrap();
    let n = bounds.len() - 1;
    let last_start = bounds[n - 1] as usize;
    for i in last_start..bytes.len() {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0x5a;
        let log = dir.path().join(log_path.file_name().unwrap());
        fs::write(&log, &corrupt).unwrap();

        let s = open(dir.path());
        assert_eq!(*s.state(), states[n - 1], "byte {i}");
        assert_eq!(
            *s.recovery(),
            Recovery {
                replayed_batches: (n - 1) as u64,
                dropped_tail_bytes: (bytes.len() - last_start) as u64,
                ..Recovery::default()
            },
            "byte {i}"
        );
    }
}

#[test]
fn log_record_with_rejected_op_is_dropped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (states, _) = commit_all(&mut open(dir.path()), vec![vec![bind("k", "a")]]);
    // A CRC-valid record whose first op applies but whose second is rejected: only possible by
    // corruption, and it must not be half-applied.
    let payload = serde_json::to_vec(&vec![bind("new", "x"), bind("k", "b")]).unwrap();
    let rec = frame(&payload);
    let mut f = OpenOptions::new()
        .append(true)
        .open(wal(dir.path()))
        .unwrap();
    f.write_all(&rec).unwrap();
    // ... followed by a valid record that must go too (it comes after the corruption).
    f.write_all(&frame(&serde_json::to_vec(&vec![bind("z", "z")]).unwrap()))
        .unwrap();
    drop(f);

    let before = fs::metadata(wal(dir.path())).unwrap().len()
        - rec.len() as u64
        - frame(&serde_json::to_vec(&vec![bind("z", "z")]).unwrap()).len() as u64;
    let s = open(dir.path());
    assert_eq!(*s.state(), states[1]);
    assert!(!s.state().owners.contains_key("new"));
    assert_eq!(s.recovery().replayed_batches, 1);
    assert_eq!(
        s.recovery().dropped_tail_bytes,
        (rec.len() + frame(&serde_json::to_vec(&vec![bind("z", "z")]).unwrap()).len()) as u64
    );
    // The record after it was whole: said, and what was cut is kept beside the log.
    assert_eq!(s.recovery().records_after_damage, 1);
    assert_eq!(s.recovery().damaged_at, Some(before));
    let name = format!(
        "{}.damaged-{before}",
        wal(dir.path()).file_name().unwrap().to_string_lossy()
    );
    let kept = fs::read(dir.path().join(name)).unwrap();
    assert_eq!(kept.len() as u64, s.recovery().dropped_tail_bytes);
}

/// Found in review: a record damaged in the middle of the log (a bad disk block, a byte
/// flipped) was taken for a torn tail, and the whole records after it, acknowledged ones among
/// them, were cut and destroyed without a word. They are now counted and kept.
#[test]
fn records_after_a_damaged_one_are_counted_and_kept_not_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bounds) = commit_all(&mut open(dir.path()), batches());
    let log = wal(dir.path());
    let mut bytes = fs::read(&log).unwrap();
    // A byte flipped in the second record's payload.
    let at = bounds[1] as usize + HEADER_LEN + 2;
    bytes[at] ^= 0x55;
    fs::write(&log, &bytes).unwrap();
    let s = open(dir.path());
    assert_eq!(s.recovery().replayed_batches, 1);
    assert_eq!(s.recovery().damaged_at, Some(bounds[1]));
    assert_eq!(
        s.recovery().records_after_damage,
        bounds.len() as u64 - 3,
        "the records after the damaged one"
    );
    let copy = dir.path().join(format!(
        "{}.damaged-{}",
        log.file_name().unwrap().to_string_lossy(),
        bounds[1]
    ));
    assert_eq!(fs::read(copy).unwrap(), bytes[bounds[1] as usize..]);
    assert!(s.recovery().damaged_kept);
    // Megabytes of random bytes after a bad record (a damaged block) are searched within a
    // bound, not for hours, and are no torn tail either.
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    commit_all(&mut open(dir.path()), batches());
    let mut bytes = fs::read(wal(dir.path())).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..(4 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.push(x as u8);
    }
    bytes.extend(frame(
        &serde_json::to_vec(&vec![bind("after", "x")]).unwrap(),
    ));
    fs::write(wal(dir.path()), &bytes).unwrap();
    let s = open(dir.path());
    assert_eq!(s.recovery().replayed_batches, 5);
    assert!(s.recovery().damaged_at.is_some());
    assert!(s.recovery().damaged_kept);
    // A torn tail is not damage: nothing is kept for it.
    drop(s);
    let dir = tempfile::tempdir().unwrap();
    let (_, bounds) = commit_all(&mut open(dir.path()), batches());
    truncate(&wal(dir.path()), bounds[bounds.len() - 1] - 3);
    let s = open(dir.path());
    assert_eq!(s.recovery().damaged_at, None);
    assert_eq!(s.recovery().records_after_damage, 0);
    assert!(s.recovery().dropped_tail_bytes > 0);
}

#[test]
fn corrupt_snapshot_and_unexpected_log_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(SNAPSHOT_FILE), b"{\"generation\": 3, \"sta").unwrap();
    assert!(matches!(
        Toy::open(dir.path()).unwrap_err(),
        StoreError::CorruptSnapshot { .. }
    ));

    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).commit(vec![bind("k", "a")]).unwrap();
    fs::write(dir.path().join("wal-7.log"), b"").unwrap();
    match Toy::open(dir.path()).unwrap_err() {
        StoreError::UnexpectedLog { path, snapshot_gen } => {
            assert_eq!(snapshot_gen, 0);
            assert!(path.ends_with("wal-7.log"));
        }
        other => panic!("expected UnexpectedLog, got {other:?}"),
    }

    // Garbage (and a huge length field) in the log is just a dropped tail.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("wal-0.log"), [0xff; 37]).unwrap();
    let s = open(dir.path());
    assert_eq!(*s.state(), Bindings::default());
    assert_eq!(s.recovery().dropped_tail_bytes, 37);
}

// ---------------------------------------------------------------- crash during compaction

#[test]
fn crash_during_compaction_recovers_every_intermediate_state() {
    // Base: generation 1 snapshot + wal-1.log with two batches.
    let base = tempfile::tempdir().unwrap();
    let expected = {
        let mut s = open(base.path());
        s.commit(vec![bind("a", "x"), bind("b", "x")]).unwrap();
        s.compact().unwrap();
        s.commit(vec![unbind("a"), bind("c", "y")]).unwrap();
        s.commit(vec![bind("a", "y")]).unwrap();
        s.state().clone()
    };
    assert_eq!(
        files(base.path()),
        names(&[LOCK_FILE, SNAPSHOT_FILE, "wal-1.log"])
    );
    // What a completed compaction to generation 2 writes as its snapshot.
    let done = tempfile::tempdir().unwrap();
    copy_dir(base.path(), done.path());
    open(done.path()).compact().unwrap();
    assert_eq!(
        files(done.path()),
        names(&[LOCK_FILE, SNAPSHOT_FILE, "wal-2.log"])
    );
    let new_snap = fs::read(done.path().join(SNAPSHOT_FILE)).unwrap();

    type Setup = fn(&Path, &[u8]);
    let scenarios: [(&str, Setup, u64, u64); 6] = [
        (
            "tmp half written",
            |d, snap| fs::write(d.join(SNAPSHOT_TMP_FILE), &snap[..snap.len() / 2]).unwrap(),
            1,
            2,
        ),
        (
            "tmp empty",
            |d, _| fs::write(d.join(SNAPSHOT_TMP_FILE), b"").unwrap(),
            1,
            2,
        ),
        (
            "tmp complete, not renamed",
            |d, snap| fs::write(d.join(SNAPSHOT_TMP_FILE), snap).unwrap(),
            1,
            2,
        ),
        (
            "renamed, new log not created, old log present",
            |d, snap| fs::write(d.join(SNAPSHOT_FILE), snap).unwrap(),
            2,
            0,
        ),
        (
            "renamed, new log created, old log present",
            |d, snap| {
                fs::write(d.join(SNAPSHOT_FILE), snap).unwrap();
                fs::write(d.join("wal-2.log"), b"").unwrap();
            },
            2,
            0,
        ),
        (
            "completed",
            |d, snap| {
                fs::write(d.join(SNAPSHOT_FILE), snap).unwrap();
                fs::write(d.join("wal-2.log"), b"").unwrap();
                fs::remove_file(d.join("wal-1.log")).unwrap();
            },
            2,
            0,
        ),
    ];
    for (name, setup, generation, replayed) in scenarios {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        setup(dir.path(), &new_snap);

        let mut s = open(dir.path());
        assert_eq!(*s.state(), expected, "{name}");
        assert_eq!(
            *s.recovery(),
            Recovery {
                replayed_batches: replayed,
                dropped_tail_bytes: 0,
                ..Recovery::default()
            },
            "{name}"
        );
        let log = log_name(generation);
        assert_eq!(
            files(dir.path()),
            names(&[LOCK_FILE, SNAPSHOT_FILE, &log]),
            "{name}"
        );
        // New commits land in the right log and survive another reopen + compaction.
        s.commit(vec![bind("after", "crash")]).unwrap();
        let mut want = expected.clone();
        want.apply(&bind("after", "crash")).unwrap();
        drop(s);
        let mut s = open(dir.path());
        assert_eq!(*s.state(), want, "{name}");
        s.compact().unwrap();
        drop(s);
        assert_eq!(*open(dir.path()).state(), want, "{name}");
    }
}

// ---------------------------------------------------------------- poisoning

#[test]
fn failed_write_poisons_until_reopen() {
    for fault in [WriteFault::Nothing, WriteFault::Half] {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let mut s = open(dir.path());
            s.commit(vec![bind("k", "a")]).unwrap();
            let before = s.state().clone();
            s.fail_next_write = Some(fault);
            let err = s.commit(vec![bind("j", "b")]).unwrap_err();
            match &err {
                StoreError::Poisoned { cause, .. } => {
                    assert!(matches!(**cause, StoreError::Io { op: "write", .. }))
                }
                other => panic!("expected Poisoned, got {other:?}"),
            }
            assert!(std::error::Error::source(&err).is_some());
            // Memory may be ahead of disk; every later call refuses.
            assert!(matches!(
                s.commit(vec![bind("x", "y")]),
                Err(StoreError::Poisoned { .. })
            ));
            assert!(matches!(s.commit(vec![]), Err(StoreError::Poisoned { .. })));
            assert!(matches!(s.compact(), Err(StoreError::Poisoned { .. })));
            before
        };
        let s = open(dir.path());
        assert_eq!(*s.state(), before, "{fault:?}");
        assert_eq!(s.recovery().replayed_batches, 1);
        assert_eq!(
            s.recovery().dropped_tail_bytes > 0,
            matches!(fault, WriteFault::Half),
            "{fault:?}"
        );
    }
}

// ---------------------------------------------------------------- model-based proptest

#[derive(Debug, Clone)]
enum Action {
    Commit(Vec<ToyOp>),
    Reopen,
    Compact,
}

fn op_strategy() -> impl Strategy<Value = ToyOp> {
    let key = (0..4u8).prop_map(|k| format!("k{k}"));
    let owner = (0..3u8).prop_map(|o| format!("o{o}"));
    prop_oneof![
        3 => (key.clone(), owner).prop_map(|(key, owner)| ToyOp::Bind { key, owner }),
        1 => key.prop_map(|key| ToyOp::Unbind { key }),
    ]
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => proptest::collection::vec(op_strategy(), 0..6).prop_map(Action::Commit),
        1 => Just(Action::Reopen),
        1 => Just(Action::Compact),
    ]
}

/// Independent model: key -> owner, plus the number of applied ops.
#[derive(Default)]
struct Model {
    owners: BTreeMap<String, String>,
    applied: u64,
}

impl Model {
    /// Returns whether the op is accepted.
    fn apply(&mut self, op: &ToyOp) -> bool {
        match op {
            ToyOp::Bind { key, owner } => match self.owners.get(key) {
                Some(cur) if cur != owner => return false,
                _ => {
                    self.owners.insert(key.clone(), owner.clone());
                }
            },
            ToyOp::Unbind { key } => {
                self.owners.remove(key);
            }
        }
        self.applied += 1;
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_commits_reopens_and_compactions_match_model(
        actions in proptest::collection::vec(action_strategy(), 1..40),
        compact_after_bytes in 0u64..600,
        sync in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options { compact_after_bytes, sync, on_flush: None, faults: None };
        let mut store = Toy::open_with(dir.path(), opts.clone()).unwrap();
        let mut model = Model::default();
        // Every (key, owner) the key has had, in order: an owner change needs an Unbind between.
        let mut history: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();

        for action in actions {
            match action {
                Action::Commit(ops) => {
                    let mut want_rejected = Vec::new();
                    for op in &ops {
                        if !model.apply(op) {
                            want_rejected.push(op.clone());
                        } else {
                            let (key, now) = match op {
                                ToyOp::Bind { key, owner } => (key, Some(owner.clone())),
                                ToyOp::Unbind { key } => (key, None),
                            };
                            let h = history.entry(key.clone()).or_default();
                            if let (Some(Some(prev)), Some(new)) = (h.last(), &now) {
                                prop_assert_eq!(prev, new, "key {} got a second owner", key);
                            }
                            h.push(now);
                        }
                    }
                    let got: Vec<ToyOp> =
                        store.commit(ops).unwrap().into_iter().map(|r| r.op).collect();
                    prop_assert_eq!(got, want_rejected);
                    prop_assert!(store.last_compaction_error().is_none());
                }
                Action::Reopen => {
                    drop(store);
                    store = Toy::open_with(dir.path(), opts.clone()).unwrap();
                    prop_assert_eq!(store.recovery().dropped_tail_bytes, 0);
                }
                Action::Compact => store.compact().unwrap(),
            }
            prop_assert_eq!(&store.state().owners, &model.owners);
            prop_assert_eq!(store.state().applied, model.applied);
        }
        drop(store);
        let store = Toy::open_with(dir.path(), opts).unwrap();
        prop_assert_eq!(&store.state().owners, &model.owners);
        prop_assert_eq!(store.state().applied, model.applied);
    }
}

// ---------------------------------------------------------------- deferred flushes, power loss

/// The last flush point the store reported, and how many it reported.
#[derive(Default)]
struct Flushes {
    last: Option<(PathBuf, u64)>,
    count: u64,
}

fn observed() -> (Arc<std::sync::Mutex<Flushes>>, Options) {
    let seen = Arc::new(std::sync::Mutex::new(Flushes::default()));
    let record = seen.clone();
    let opts = Options {
        on_flush: Some(Arc::new(move |path: &Path, len: u64| {
            let mut f = record.lock().unwrap();
            f.last = Some((path.to_path_buf(), len));
            f.count += 1;
        })),
        ..no_compact()
    };
    (seen, opts)
}

/// What a power loss leaves: the log as of its last flush (the page cache's unflushed writes
/// are gone).
fn lose_power(seen: &std::sync::Mutex<Flushes>) {
    if let Some((path, len)) = &seen.lock().unwrap().last
        && path.exists()
    {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(*len)
            .unwrap();
    }
}

#[test]
fn a_deferred_commit_is_lost_only_to_a_power_loss_before_the_next_flush() {
    let (seen, opts) = observed();
    // Commits `a` flushed and `b` deferred, then stops (a process crash).
    let start = |dir: &Path| {
        let mut s = Toy::open_with(dir, opts.clone()).unwrap();
        let count = seen.lock().unwrap().count;
        s.commit(vec![bind("a", "1")]).unwrap();
        assert_eq!(
            seen.lock().unwrap().count,
            count + 1,
            "a flushed commit flushes"
        );
        assert!(!s.has_unflushed());
        s.commit_with(vec![bind("b", "1")], Flush::Deferred)
            .unwrap();
        assert_eq!(
            seen.lock().unwrap().count,
            count + 1,
            "a deferred commit does not"
        );
        assert!(s.has_unflushed());
        assert_eq!(s.state().owners.len(), 2, "applied at once all the same");
    };
    let a_only = BTreeMap::from([("a".to_owned(), "1".to_owned())]);

    // A power loss before any flush: only the flushed batch is left, cut at its end.
    let dir = tempfile::tempdir().unwrap();
    start(dir.path());
    lose_power(&seen);
    let s = Toy::open_with(dir.path(), opts.clone()).unwrap();
    assert_eq!(s.state().owners, a_only);
    assert_eq!(s.recovery().dropped_tail_bytes, 0);
    drop(s);

    // A crash of the process keeps the deferred record (the page cache has it), and the open
    // that replays it makes it durable before anything acts on it.
    let dir = tempfile::tempdir().unwrap();
    start(dir.path());
    let mut s = Toy::open_with(dir.path(), opts.clone()).unwrap();
    assert_eq!(s.state().owners.len(), 2);
    lose_power(&seen);
    drop(s);
    // (That the open's fsync reaches the disk no test here can see; that it reports what it
    // replayed as its flush point, and replays it whole, it can.)
    s = Toy::open_with(dir.path(), opts.clone()).unwrap();
    assert_eq!(s.state().owners.len(), 2, "reported as flushed by the open");

    // A flushed commit covers the deferred ones before it.
    s.commit_with(vec![bind("c", "1")], Flush::Deferred)
        .unwrap();
    s.commit(vec![bind("d", "1")]).unwrap();
    drop(s);
    lose_power(&seen);
    s = Toy::open_with(dir.path(), opts.clone()).unwrap();
    assert_eq!(s.state().owners.len(), 4, "{:?}", s.state().owners);

    // So does an explicit flush; with nothing deferred it does nothing.
    s.commit_with(vec![bind("e", "1")], Flush::Deferred)
        .unwrap();
    s.flush().unwrap();
    let count = seen.lock().unwrap().count;
    s.flush().unwrap();
    assert_eq!(seen.lock().unwrap().count, count, "nothing left to flush");
    drop(s);
    lose_power(&seen);
    let s = Toy::open_with(dir.path(), opts).unwrap();
    assert_eq!(s.state().owners.len(), 5);
}

#[test]
fn a_failed_write_or_flush_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.commit_with(vec![bind("a", "1")], Flush::Deferred)
        .unwrap();
    s.fail_next_write = Some(WriteFault::Nothing);
    assert!(
        s.commit_with(vec![bind("b", "1")], Flush::Deferred)
            .is_err()
    );
    assert!(matches!(s.flush(), Err(StoreError::Poisoned { .. })));

    // A flush that fails: the deferred batch is not durable, and nothing goes on.
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.commit_with(vec![bind("a", "1")], Flush::Deferred)
        .unwrap();
    s.fail_next_sync = true;
    let err = format!("{:?}", s.flush().unwrap_err());
    assert!(err.contains("fdatasync"), "{err}");
    assert!(s.has_unflushed());
    assert!(matches!(
        s.commit(vec![bind("b", "1")]),
        Err(StoreError::Poisoned { .. })
    ));
    // Opened again in the same process (whose page cache still holds the record): the batch
    // that was never acknowledged is not acted on.
    drop(s);
    let s = open(dir.path());
    assert!(!s.state().owners.contains_key("a"), "found in review");
    drop(s);
    // Also when the flush is a flushed commit's own; what was flushed before it stays.
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.commit(vec![bind("kept", "1")]).unwrap();
    s.fail_next_sync = true;
    assert!(s.commit(vec![bind("a", "1")]).is_err());
    assert!(matches!(s.flush(), Err(StoreError::Poisoned { .. })));
    drop(s);
    let s = open(dir.path());
    assert!(!s.state().owners.contains_key("a"));
    assert!(s.state().owners.contains_key("kept"));
}

/// Found in review: a compaction that failed (no room for a snapshot, say) was retried at every
/// commit, a whole snapshot written each time, and said nowhere. It is now counted, and tried
/// again only once the log has grown by an eighth of its threshold.
#[test]
fn a_failed_compaction_is_counted_and_not_retried_at_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        compact_after_bytes: 400,
        sync: true,
        on_flush: None,
        faults: None,
    };
    let mut s = Toy::open_with(dir.path(), opts).unwrap();
    // The snapshot's temporary file cannot be made.
    fs::create_dir(dir.path().join(SNAPSHOT_TMP_FILE)).unwrap();
    let mut i = 0;
    while s.compaction_failures() == 0 {
        s.commit(vec![bind(&format!("k{i}"), "o")]).unwrap();
        i += 1;
        assert!(i < 100, "the log never passed its threshold");
    }
    assert!(s.last_compaction_error().is_some());
    let generation = s.generation;
    // Right after, the next commits do not try again (a record is about 40 bytes: 50 bytes
    // more of log is one or two records).
    s.commit(vec![bind("again", "o")]).unwrap();
    assert_eq!(s.compaction_failures(), 1);
    // Room again: once the log has grown enough, it compacts, and says so no more.
    fs::remove_dir(dir.path().join(SNAPSHOT_TMP_FILE)).unwrap();
    for j in 0..10 {
        s.commit(vec![bind(&format!("m{j}"), "o")]).unwrap();
    }
    assert!(s.generation > generation);
    assert!(s.last_compaction_error().is_none());
    assert_eq!(s.compaction_failures(), 1);
}

#[derive(Debug, Clone)]
enum PowerAction {
    Commit(Vec<ToyOp>, Flush),
    Flush,
    Compact,
    PowerLoss,
}

fn power_action_strategy() -> impl Strategy<Value = PowerAction> {
    let flush = prop_oneof![Just(Flush::Now), Just(Flush::Deferred)];
    prop_oneof![
        6 => (proptest::collection::vec(op_strategy(), 0..6), flush)
            .prop_map(|(ops, f)| PowerAction::Commit(ops, f)),
        1 => Just(PowerAction::Flush),
        1 => Just(PowerAction::Compact),
        2 => Just(PowerAction::PowerLoss),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever mix of flushed and deferred commits, flushes and compactions, a power loss
    /// leaves exactly the state of the last flush: nothing flushed is lost, nothing deferred
    /// after it is half kept.
    #[test]
    fn a_power_loss_keeps_exactly_what_was_flushed(
        actions in proptest::collection::vec(power_action_strategy(), 1..40),
        compact_after_bytes in 0u64..600,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (seen, opts) = observed();
        let opts = Options { compact_after_bytes, ..opts };
        let mut store = Toy::open_with(dir.path(), opts.clone()).unwrap();
        let mut model = Model::default();
        let mut flushed = (BTreeMap::new(), 0u64);
        for action in actions {
            let before = seen.lock().unwrap().count;
            match action {
                PowerAction::Commit(ops, flush) => {
                    for op in &ops {
                        model.apply(op);
                    }
                    let generation = store.generation;
                    store.commit_with(ops, flush).unwrap();
                    if flush == Flush::Deferred && store.generation == generation {
                        prop_assert_eq!(seen.lock().unwrap().count, before, "a deferred commit flushed");
                    }
                }
                PowerAction::Flush => store.flush().unwrap(),
                PowerAction::Compact => store.compact().unwrap(),
                PowerAction::PowerLoss => {
                    drop(store);
                    lose_power(&seen);
                    store = Toy::open_with(dir.path(), opts.clone()).unwrap();
                    prop_assert_eq!(store.recovery().dropped_tail_bytes, 0);
                    model.owners = flushed.0.clone();
                    model.applied = flushed.1;
                }
            }
            if seen.lock().unwrap().count > before {
                // A flush covers every record written before it.
                flushed = (model.owners.clone(), model.applied);
            }
            prop_assert_eq!(&store.state().owners, &model.owners);
            prop_assert_eq!(store.state().applied, model.applied);
        }
    }
}

#[test]
fn a_poisoned_store_reopened_has_what_was_acknowledged_and_takes_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.commit(vec![bind("a", "1")]).unwrap();
    s.fail_next_write = Some(WriteFault::Half);
    assert!(s.commit(vec![bind("b", "2")]).is_err());
    assert!(matches!(
        s.commit(vec![bind("c", "3")]),
        Err(StoreError::Poisoned { .. })
    ));

    s.reopen().unwrap();
    // The acknowledged commit is there; the failed one (its torn half) is not.
    let keys = |s: &Store<Bindings>| s.state().owners.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&s), ["a"]);
    assert!(s.recovery().dropped_tail_bytes > 0);
    s.commit(vec![bind("c", "3")]).unwrap();
    // Still the lock's holder: nobody else may open it.
    assert!(matches!(
        Store::<Bindings>::open(dir.path()),
        Err(StoreError::Locked { .. })
    ));
    drop(s);
    assert_eq!(keys(&open(dir.path())), ["a", "c"]);
}
