//! Embedded, crash-safe, single-writer state store: an in-memory [`StateMachine`] persisted as a
//! snapshot plus a write-ahead log with group commit (one log record and one fdatasync per
//! [`Store::commit`]).
//!
//! A batch whose loss the caller can recover from may be committed with [`Flush::Deferred`]:
//! its record is written at once but not flushed; the next flushed commit (or [`Store::flush`])
//! makes it durable together with its own. The log stays a sequence: a power loss keeps a
//! prefix of it (a torn or unflushed record and everything after it are dropped at open), so a
//! flushed batch is never kept without the deferred ones before it.
//!
//! On-disk design (generation-named logs). `snapshot.json` is `{"generation": G, "state": ...}`;
//! no snapshot means generation 0 with `S::default()`. Ops committed after snapshot G live in
//! `wal-G.log` as records `u32 LE payload len | u32 LE crc32(payload) | JSON array of ops`.
//! Compaction writes `snapshot.json.tmp` (generation G+1), fsyncs it, renames it over
//! `snapshot.json`, fsyncs the directory, creates `wal-(G+1).log`, fsyncs the directory again and
//! only then deletes `wal-G.log`. The rename is the commit point: before it, the old snapshot and
//! `wal-G.log` are intact (`open` deletes a leftover tmp); after it, the snapshot already holds
//! everything in `wal-G.log`, so `open` deletes logs older than the snapshot and creates a missing
//! `wal-G.log`. A log newer than the snapshot cannot arise from this sequence and is an error.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

const SNAPSHOT_FILE: &str = "snapshot.json";
const SNAPSHOT_TMP_FILE: &str = "snapshot.json.tmp";
const LOCK_FILE: &str = "lock";
const HEADER_LEN: usize = 8;

/// An op's JSON and its decoded copy, or why it cannot be logged.
type Encoded<Op> = Result<(Vec<u8>, Op), String>;

/// A deterministic state machine whose ops are persisted by [`Store`].
pub trait StateMachine: Default + Serialize + DeserializeOwned {
    /// One mutation. It must survive a JSON round trip (the store applies the decoded copy, so
    /// memory always equals what replay produces).
    type Op: Serialize + DeserializeOwned + Clone;
    /// Validate and apply one op. On Err the state must be unchanged.
    fn apply(&mut self, op: &Self::Op) -> Result<(), String>;
}

/// Called after each flush with the log and its length that is now durable (for tests that
/// simulate a power loss by cutting the log there).
pub type FlushObserver = Arc<dyn Fn(&Path, u64) + Send + Sync>;

/// Tuning knobs for [`Store::open_with`].
#[derive(Clone)]
pub struct Options {
    /// `commit` compacts automatically once the current log is larger than this many bytes.
    pub compact_after_bytes: u64,
    /// fdatasync the log after every commit. Turning this off gives up durability on power loss
    /// (not on process crash); only meant for tests and throwaway stores.
    pub sync: bool,
    /// Told of every flush (also when `sync` is off: the points where the store would flush).
    pub on_flush: Option<FlushObserver>,
    /// Failures a test injects into the store's writes (a full disk that no test has to
    /// mount and fill).
    pub faults: Option<Arc<Faults>>,
}

/// Failures injected into a store's writes: while `no_space` is set, every write of a record
/// and every [`Store::probe_writable`] fails as a full disk does (`No space left on device`),
/// writing nothing.
#[derive(Debug, Default)]
pub struct Faults {
    no_space: std::sync::atomic::AtomicBool,
}

impl Faults {
    pub fn set_no_space(&self, on: bool) {
        self.no_space.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        if self.no_space.load(std::sync::atomic::Ordering::SeqCst) {
            // ENOSPC, as the kernel reports it.
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

/// What [`Store::probe_writable`] writes (and flushes) before a failed store is trusted again:
/// room for more than a few batches, so that the first commit after does not fail at once.
const PROBE_BYTES: usize = 256 * 1024;
const PROBE_FILE: &str = "probe.tmp";

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("compact_after_bytes", &self.compact_after_bytes)
            .field("sync", &self.sync)
            .field("on_flush", &self.on_flush.is_some())
            .field("faults", &self.faults)
            .finish()
    }
}

impl Options {
    fn report_flush(&self, log: &Path, len: u64) {
        if let Some(observe) = &self.on_flush {
            observe(log, len);
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            compact_after_bytes: 64 * 1024 * 1024,
            sync: true,
            on_flush: None,
            faults: None,
        }
    }
}

/// Whether [`Store::commit_with`] waits for its record to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Write and fdatasync: durable when the call returns (with every deferred batch before it).
    Now,
    /// Write only: a crash of the process keeps it (the page cache does), a power loss may not.
    /// Durable with the next flushed commit or [`Store::flush`].
    Deferred,
}

/// What `open` found on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Log records (batches) replayed on top of the snapshot.
    pub replayed_batches: u64,
    /// Bytes cut from the end of the log because they were torn, corrupt or rejected.
    pub dropped_tail_bytes: u64,
    /// Whole, readable records that followed the first bad one, and were cut with it. A torn
    /// write leaves none: these mean the log was damaged (or written by another version)
    /// before records that may have been acknowledged. The cut bytes are kept beside the log,
    /// in `wal-G.log.damaged-OFFSET`.
    pub records_after_damage: u64,
    /// Where the first bad record began, when records followed it.
    pub damaged_at: Option<u64>,
    /// What was cut then is kept in `wal-G.log.damaged-OFFSET` (false: writing it failed).
    pub damaged_kept: bool,
}

/// An op that the state machine (or the encoder) refused, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected<Op> {
    pub op: Op,
    pub reason: String,
}

/// Every error the store reports.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {dir} is locked by another process (pid {})", fmt_pid(.pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt snapshot {path}")]
    CorruptSnapshot {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot serialize state into {path}")]
    SerializeState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("log {path} is newer than snapshot generation {snapshot_gen}; refusing to guess")]
    UnexpectedLog { path: PathBuf, snapshot_gen: u64 },
    #[error("replaying {path} is not deterministic: {reason}")]
    Replay { path: PathBuf, reason: String },
    #[error("batch of {bytes} bytes does not fit one log record (store {dir})")]
    BatchTooLarge { dir: PathBuf, bytes: u64 },
    #[error("store {dir} is poisoned by an earlier failed write; reopen it")]
    Poisoned {
        dir: PathBuf,
        #[source]
        cause: Arc<StoreError>,
    },
}

fn fmt_pid(pid: &Option<u32>) -> String {
    match pid {
        Some(p) => p.to_string(),
        None => "unknown".to_owned(),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

#[derive(Serialize)]
struct SnapshotRef<'a, S> {
    generation: u64,
    state: &'a S,
}

#[derive(Deserialize)]
#[serde(bound = "S: DeserializeOwned")]
struct SnapshotOwned<S> {
    generation: u64,
    state: S,
}

/// The store. Single writer: `open` holds an exclusive lock on `dir/lock` until drop.
pub struct Store<S: StateMachine> {
    dir: PathBuf,
    opts: Options,
    state: S,
    generation: u64,
    log: File,
    log_len: u64,
    /// The log's length at the last flush (or open): what is known durable.
    flushed_len: u64,
    /// A deferred record was written after the last flush.
    unflushed: bool,
    recovery: Recovery,
    poisoned: Option<Arc<StoreError>>,
    last_compaction_error: Option<StoreError>,
    /// Compactions that failed (before their commit point) since open.
    compaction_failures: u64,
    /// After a failed compaction, the log length before which it is not tried again.
    retry_compaction_at: u64,
    _lock: File,
    #[cfg(test)]
    fail_next_write: Option<tests::WriteFault>,
    #[cfg(test)]
    fail_next_sync: bool,
}

impl<S: StateMachine> fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .field("log_len", &self.log_len)
            .field("recovery", &self.recovery)
            .field("poisoned", &self.poisoned.is_some())
            .finish_non_exhaustive()
    }
}

fn log_name(generation: u64) -> String {
    format!("wal-{generation}.log")
}

fn parse_log_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn remove_if_exists(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// Splits the next whole, CRC-valid record off `bytes[pos..]`; None if short or corrupt.
fn next_frame(bytes: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(pos..)?;
    let len = frame_len(bytes, pos)?;
    let crc_bytes: [u8; 4] = rest.get(4..8)?.try_into().ok()?;
    let payload = rest.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
    if crc32fast::hash(payload) != u32::from_le_bytes(crc_bytes) {
        return None;
    }
    Some((payload, pos + HEADER_LEN + len))
}

/// The payload length a record header at `pos` says.
fn frame_len(bytes: &[u8], pos: usize) -> Option<usize> {
    let len_bytes: [u8; 4] = bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(len_bytes)).ok()
}

/// How many whole records (a frame whose checksum holds and whose payload is a batch of ops)
/// begin after the bad record at `bad`, searched byte by byte.
///
/// Bounded, as it reads damaged bytes: in random bytes, one place in sixty-odd has a length
/// that fits a 64 MiB log, and checking each such candidate's checksum over megabytes would
/// take hours. Candidates longer than [`SCAN_RECORD_MAX`] are passed over, and the search
/// stops after checksumming [`SCAN_BYTES_MAX`]: the count is then a lower bound, and `true`
/// says so (that many damaged bytes are no torn write either).
fn whole_records_after<Op: DeserializeOwned>(bytes: &[u8], bad: usize) -> (u64, bool) {
    let mut n = 0;
    let mut p = bad + 1;
    let mut hashed = 0usize;
    while p + HEADER_LEN <= bytes.len() && hashed <= SCAN_BYTES_MAX {
        let len = frame_len(bytes, p).unwrap_or(usize::MAX);
        if len > SCAN_RECORD_MAX || len > bytes.len() - p - HEADER_LEN {
            p += 1;
            continue;
        }
        hashed += len;
        match next_frame(bytes, p) {
            Some((payload, end)) if serde_json::from_slice::<Vec<Op>>(payload).is_ok() => {
                n += 1;
                p = end;
            }
            _ => p += 1,
        }
    }
    (n, hashed > SCAN_BYTES_MAX)
}

/// The longest record [`whole_records_after`] looks for (a batch is kilobytes).
const SCAN_RECORD_MAX: usize = 1 << 20;
/// The most bytes [`whole_records_after`] checksums.
const SCAN_BYTES_MAX: usize = 64 << 20;

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    // No truncate here: the file may belong to a live holder whose pid we want to report.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            // Best effort: the holder may not have written its pid yet.
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_err("write pid to", &path))?;
    Ok(file)
}

impl<S: StateMachine> Store<S> {
    /// Opens (creating if needed) the store in `dir` with default [`Options`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Options::default())
    }

    /// Opens (creating if needed) the store in `dir`: locks it, loads the snapshot, replays the
    /// log and truncates a torn or corrupt tail (see [`Store::recovery`]).
    pub fn open_with(dir: &Path, opts: Options) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock = lock_dir(dir)?;
        Self::open_locked(dir, opts, lock)
    }

    /// Reads the store again from disk, as a restart would, keeping its lock: what a failed
    /// write left in memory (a poisoned store) is dropped, a torn tail truncated. Once a failed
    /// write's cause is mended (a full disk has room again), the store is usable again. On
    /// error the store stays as it was.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        let lock = self
            ._lock
            .try_clone()
            .map_err(io_err("duplicate lock file", &self.dir.join(LOCK_FILE)))?;
        *self = Self::open_locked(&self.dir, self.opts.clone(), lock)?;
        Ok(())
    }

    /// Whether the store's folder takes a write again (after a failed one): writes and
    /// flushes `PROBE_BYTES` there, then removes them.
    pub fn probe_writable(&self) -> io::Result<()> {
        if let Some(f) = &self.opts.faults {
            f.check()?;
        }
        let path = self.dir.join(PROBE_FILE);
        let written = File::create(&path).and_then(|mut f| {
            f.write_all(&[0u8; PROBE_BYTES])?;
            f.sync_all()
        });
        let removed = fs::remove_file(&path);
        written.and(removed)
    }

    fn open_locked(dir: &Path, opts: Options, lock: File) -> Result<Self, StoreError> {
        remove_if_exists(&dir.join(SNAPSHOT_TMP_FILE))?;

        let snap_path = dir.join(SNAPSHOT_FILE);
        let snap_bytes = match fs::read(&snap_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &snap_path)(e)),
        };
        let load_base = || -> Result<(u64, S), StoreError> {
            match &snap_bytes {
                None => Ok((0, S::default())),
                Some(b) => serde_json::from_slice::<SnapshotOwned<S>>(b)
                    .map(|s| (s.generation, s.state))
                    .map_err(|source| StoreError::CorruptSnapshot {
                        path: snap_path.clone(),
                        source,
                    }),
            }
        };
        let (generation, mut state) = load_base()?;

        // Sort the logs: older than the snapshot = stale (already folded in), newer = impossible.
        let mut stale = Vec::new();
        let entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", dir))?;
            let Some(g) = entry.file_name().to_str().and_then(parse_log_name) else {
                continue;
            };
            if g > generation {
                return Err(StoreError::UnexpectedLog {
                    path: entry.path(),
                    snapshot_gen: generation,
                });
            }
            if g < generation {
                stale.push(entry.path());
            }
        }
        if !stale.is_empty() {
            // Make the snapshot that supersedes them durable before deleting anything.
            File::open(&snap_path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &snap_path))?;
            sync_dir(dir)?;
            for path in &stale {
                remove_if_exists(path)?;
            }
            sync_dir(dir)?;
        }

        let log_path = dir.join(log_name(generation));
        let existed = log_path.exists();
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        if !existed {
            sync_dir(dir)?;
        }
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)
            .map_err(io_err("read", &log_path))?;

        // Replay whole records; stop at the first short / bad-CRC / unparsable / rejected one.
        let mut pos = 0;
        let mut replayed = 0u64;
        let mut rejected_at = None;
        'records: while let Some((payload, end)) = next_frame(&bytes, pos) {
            let Ok(ops) = serde_json::from_slice::<Vec<S::Op>>(payload) else {
                break;
            };
            for op in &ops {
                if state.apply(op).is_err() {
                    rejected_at = Some(pos);
                    break 'records;
                }
            }
            replayed += 1;
            pos = end;
        }
        if let Some(bad) = rejected_at {
            // Part of that batch is already applied and S cannot be rolled back: rebuild from
            // the snapshot with only the batches before it (all of which applied cleanly).
            state = load_base()?.1;
            let mut p = 0;
            while p < bad {
                let Some((payload, end)) = next_frame(&bytes, p) else {
                    break;
                };
                let ops = serde_json::from_slice::<Vec<S::Op>>(payload).map_err(|e| {
                    StoreError::Replay {
                        path: log_path.clone(),
                        reason: e.to_string(),
                    }
                })?;
                for op in &ops {
                    state.apply(op).map_err(|reason| StoreError::Replay {
                        path: log_path.clone(),
                        reason,
                    })?;
                }
                p = end;
            }
        }

        let valid = pos as u64;
        let total = bytes.len() as u64;
        let mut records_after_damage = 0;
        let mut damaged_at = None;
        let mut damaged_kept = false;
        if valid < total {
            // Whole records after the bad one: not a torn write. They cannot be replayed
            // without the one before them; what was cut is kept beside the log, not destroyed.
            let (whole, searched_out) = whole_records_after::<S::Op>(&bytes, pos);
            records_after_damage = whole;
            if whole > 0 || searched_out {
                damaged_at = Some(valid);
                // Best effort: a full disk must not keep the store from opening.
                let copy = dir.join(format!("{}.damaged-{valid}", log_name(generation)));
                damaged_kept = File::create(&copy)
                    .and_then(|mut f| f.write_all(&bytes[pos..]).and_then(|()| f.sync_all()))
                    .is_ok()
                    && sync_dir(dir).is_ok();
                if !damaged_kept {
                    let _ = fs::remove_file(&copy);
                }
            }
            log.set_len(valid).map_err(io_err("truncate", &log_path))?;
        }
        // What is replayed is acted on: make it durable first (a crashed process may have left
        // deferred records that only the page cache holds). This cannot bring back what a
        // failed flush lost: the kernel may have dropped those pages already (the previous
        // process stopped at that failure, before reporting anything that waited for it).
        if opts.sync {
            log.sync_all().map_err(io_err("fsync", &log_path))?;
        }
        opts.report_flush(&log_path, valid);

        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            state,
            generation,
            log,
            log_len: valid,
            flushed_len: valid,
            unflushed: false,
            recovery: Recovery {
                replayed_batches: replayed,
                dropped_tail_bytes: total - valid,
                records_after_damage,
                damaged_at,
                damaged_kept,
            },
            poisoned: None,
            last_compaction_error: None,
            compaction_failures: 0,
            retry_compaction_at: 0,
            _lock: lock,
            #[cfg(test)]
            fail_next_write: None,
            #[cfg(test)]
            fail_next_sync: false,
        })
    }

    /// The current in-memory state (everything committed, plus anything a poisoning failure left).
    pub fn state(&self) -> &S {
        &self.state
    }

    /// What `open` found.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The error of the last failed automatic compaction, if the latest attempt failed. Such a
    /// failure does not fail the commit (the batch was already durable in the log).
    pub fn last_compaction_error(&self) -> Option<&StoreError> {
        self.last_compaction_error.as_ref()
    }

    /// Compactions that failed since open (the log then grows past its threshold).
    pub fn compaction_failures(&self) -> u64 {
        self.compaction_failures
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &self.poisoned {
            Some(cause) => Err(StoreError::Poisoned {
                dir: self.dir.clone(),
                cause: Arc::clone(cause),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, cause: StoreError) -> StoreError {
        let cause = Arc::new(cause);
        self.poisoned = Some(Arc::clone(&cause));
        StoreError::Poisoned {
            dir: self.dir.clone(),
            cause,
        }
    }

    /// Applies the ops the state machine accepts, in order, writes the accepted ones as one log
    /// record, fdatasyncs (unless `sync` is off) and returns the rejected ones with reasons.
    /// An op that does not survive a JSON round trip is rejected without touching the state.
    /// If the write or sync fails the store is poisoned and this and every later call returns
    /// [`StoreError::Poisoned`].
    pub fn commit(&mut self, ops: Vec<S::Op>) -> Result<Vec<Rejected<S::Op>>, StoreError> {
        self.commit_with(ops, Flush::Now)
    }

    /// [`Store::commit`], flushed or not as `flush` says.
    pub fn commit_with(
        &mut self,
        ops: Vec<S::Op>,
        flush: Flush,
    ) -> Result<Vec<Rejected<S::Op>>, StoreError> {
        self.check_poisoned()?;

        // Encode everything before touching the state, so nothing below can fail half-way
        // except the disk write itself.
        let encoded: Vec<Encoded<S::Op>> = ops
            .iter()
            .map(|op| {
                let json = serde_json::to_vec(op).map_err(|e| format!("cannot encode op: {e}"))?;
                let decoded = serde_json::from_slice::<S::Op>(&json)
                    .map_err(|e| format!("op does not survive a JSON round trip: {e}"))?;
                Ok((json, decoded))
            })
            .collect();
        let upper_bound: u64 = encoded
            .iter()
            .map(|e| e.as_ref().map_or(0, |(j, _)| j.len() as u64 + 1))
            .sum::<u64>()
            + 2;
        if upper_bound > u64::from(u32::MAX) {
            return Err(StoreError::BatchTooLarge {
                dir: self.dir.clone(),
                bytes: upper_bound,
            });
        }

        let mut payload = vec![b'['];
        let mut accepted = 0usize;
        let mut rejected = Vec::new();
        for (op, enc) in ops.into_iter().zip(encoded) {
            let reason = match enc {
                Err(reason) => reason,
                Ok((json, decoded)) => match self.state.apply(&decoded) {
                    Ok(()) => {
                        if accepted > 0 {
                            payload.push(b',');
                        }
                        payload.extend_from_slice(&json);
                        accepted += 1;
                        continue;
                    }
                    Err(reason) => reason,
                },
            };
            rejected.push(Rejected { op, reason });
        }
        if accepted == 0 {
            return Ok(rejected);
        }
        payload.push(b']');

        if let Err(e) = self.append_record(&payload) {
            return Err(self.poison(e));
        }
        self.unflushed = true;
        if flush == Flush::Now {
            self.flush()?;
        }

        if self.log_len > self.opts.compact_after_bytes && self.log_len >= self.retry_compaction_at
        {
            // The batch is in the log already (flushed, or deferred as asked); a failed
            // compaction does not fail the commit (if it failed past its commit point it
            // poisons the store, which the next call reports). It is counted, and not tried
            // again (a whole snapshot written each time) until the log has grown by another
            // eighth of the threshold.
            match self.compact() {
                Ok(()) => {
                    self.last_compaction_error = None;
                    self.retry_compaction_at = 0;
                }
                Err(e) => {
                    self.compaction_failures += 1;
                    self.retry_compaction_at = self
                        .log_len
                        .saturating_add((self.opts.compact_after_bytes / 8).max(1));
                    self.last_compaction_error = Some(e);
                }
            }
        }
        Ok(rejected)
    }

    fn append_record(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        let log_path = self.dir.join(log_name(self.generation));
        let len = u32::try_from(payload.len()).map_err(|_| StoreError::BatchTooLarge {
            dir: self.dir.clone(),
            bytes: payload.len() as u64,
        })?;
        let mut record = Vec::with_capacity(HEADER_LEN + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);

        if let Some(f) = &self.opts.faults {
            f.check().map_err(io_err("write", &log_path))?;
        }
        #[cfg(test)]
        if let Some(fault) = self.fail_next_write.take() {
            return tests::inject_write_fault(fault, &mut self.log, &record)
                .map_err(io_err("write", &log_path));
        }

        self.log
            .write_all(&record)
            .map_err(io_err("write", &log_path))?;
        self.log_len += record.len() as u64;
        Ok(())
    }

    /// Makes every record written so far durable (nothing to do if none was deferred since the
    /// last flush). A failed flush poisons the store.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if !self.unflushed {
            return Ok(());
        }
        let log_path = self.dir.join(log_name(self.generation));
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_sync) {
            let e = io::Error::other("injected fdatasync failure");
            self.unwrite();
            return Err(self.poison(io_err("fdatasync", &log_path)(e)));
        }
        if self.opts.sync
            && let Err(e) = self.log.sync_data()
        {
            self.unwrite();
            return Err(self.poison(io_err("fdatasync", &log_path)(e)));
        }
        self.unflushed = false;
        self.flushed_len = self.log_len;
        self.opts.report_flush(&log_path, self.log_len);
        Ok(())
    }

    /// A flush failed: the records since the last one were never acknowledged, and are cut
    /// from the log, so that opening the store again (in this process, whose page cache may
    /// still hold them while the disk does not) does not act on them. Best effort: should the
    /// cut fail too, a later open may find them.
    fn unwrite(&mut self) {
        if self.log.set_len(self.flushed_len).is_ok() {
            let _ = self.log.sync_data();
            self.log_len = self.flushed_len;
        }
    }

    /// A record was committed with [`Flush::Deferred`] and not flushed since.
    pub fn has_unflushed(&self) -> bool {
        self.unflushed
    }

    /// Writes the full state to `snapshot.json` atomically and starts an empty log of the next
    /// generation. Called automatically by `commit` once the log exceeds `compact_after_bytes`.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let new_generation = self.generation + 1;
        let tmp = self.dir.join(SNAPSHOT_TMP_FILE);

        // Before the rename nothing on disk has changed meaning: failures just clean up.
        let bytes = serde_json::to_vec(&SnapshotRef {
            generation: new_generation,
            state: &self.state,
        })
        .map_err(|source| StoreError::SerializeState {
            path: tmp.clone(),
            source,
        })?;
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
            .map_err(io_err("write", &tmp));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }

        // From the rename on, disk may already say generation+1 while we still append to the old log:
        // any failure must poison the store.
        if let Err(e) = self.switch_generation(&tmp, new_generation) {
            return Err(self.poison(e));
        }
        Ok(())
    }

    fn switch_generation(&mut self, tmp: &Path, new_generation: u64) -> Result<(), StoreError> {
        let snap = self.dir.join(SNAPSHOT_FILE);
        fs::rename(tmp, &snap).map_err(io_err("rename snapshot into", &snap))?;
        sync_dir(&self.dir)?;
        let new_path = self.dir.join(log_name(new_generation));
        let new_log = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&new_path)
            .map_err(io_err("create", &new_path))?;
        sync_dir(&self.dir)?;
        let old_path = self.dir.join(log_name(self.generation));
        self.log = new_log;
        self.generation = new_generation;
        self.log_len = 0;
        self.flushed_len = 0;
        // The snapshot holds everything, durably.
        self.unflushed = false;
        self.opts.report_flush(&new_path, 0);
        // The old log is already superseded; if removing it fails, the next open removes it.
        if fs::remove_file(&old_path).is_ok() {
            let _ = sync_dir(&self.dir);
        }
        Ok(())
    }
}
