//! The audit log: one JSON line per key operation (time, peer identity, peer address,
//! rpc, volume_id, version, result). Each line ends in `"hash"`, the SHA-256 of the line
//! before that field, and carries in `"prev"` the hash of the previous line: an edited
//! line no longer matches its own hash, and a removed, inserted or reordered line breaks
//! the chain, so `verify` names the first bad line.
//!
//! Audit before release: a call's response waits until its line is written (and, by
//! default, fsynced). Lines are group-committed by one writer thread, so concurrent calls
//! share an fsync; while other calls are waiting too, a batch is held open for up to the
//! commit delay so that more of them share it (a lone call is never held, nor a batch
//! that already shares its fsync [`NO_DELAY_BATCH`] ways). Never key
//! material: an [`AuditEvent`] has no field that could hold it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One key operation, as recorded. The peer's names are shared with its connection and
/// the rpc and result names are static, so recording a call copies no string but the
/// volume id it was given (and a refusal's message, moved in).
#[derive(Debug, Serialize)]
pub struct AuditEvent {
    /// The caller's SPIFFE id (or `"unauthenticated: <why>"`).
    pub peer: Arc<str>,
    /// The caller's socket address.
    pub peer_addr: Arc<str>,
    /// The RPC name.
    pub rpc: &'static str,
    /// The volume concerned (empty for listings).
    pub volume_id: Arc<str>,
    /// The key version concerned, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The gRPC code name of the outcome ("OK", "PERMISSION_DENIED", …).
    pub result: &'static str,
    /// Extra context: the error message, or e.g. the new node of a rebind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// An [`AuditEvent`] as read back: the same fields, owned.
#[derive(Deserialize)]
#[allow(dead_code)] // every field is parsed so that a line missing one is refused
struct RecordedEvent {
    peer: String,
    peer_addr: String,
    rpc: String,
    volume_id: String,
    #[serde(default)]
    version: Option<u64>,
    result: String,
    #[serde(default)]
    detail: Option<String>,
}

/// A line as written: the same fields as [`Line`], borrowed (no copy of the event).
#[derive(Serialize)]
struct LineRef<'a> {
    seq: u64,
    time: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

/// A line as read back. Every field is parsed, so `verify` refuses a line that lacks one;
/// only `seq` and `prev` take part in the chain.
#[derive(Deserialize)]
struct Line {
    seq: u64,
    #[allow(dead_code)]
    time: String,
    #[allow(dead_code)]
    #[serde(flatten)]
    event: RecordedEvent,
    prev: String,
}

/// Audit errors.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log could not be opened, read or written.
    #[error("audit log {path}: {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// The writer thread is gone.
    #[error("audit log writer stopped; refusing to serve keys unaudited")]
    Stopped,
}

/// A verification failure at a line (1-based).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct VerifyError {
    /// The first bad line.
    pub line: u64,
    /// What is wrong with it.
    pub what: String,
}

type Job = (AuditEvent, oneshot::Sender<Result<(), String>>);

/// Most lines in one batch (one write, one fsync).
const MAX_BATCH: usize = 1024;

/// Moves the jobs already queued into `batch`, up to [`MAX_BATCH`].
fn take_waiting(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    batches: Arc<AtomicU64>,
}

fn sha256_hex(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// Splits a written line into the hashed preimage (the object without its hash field)
/// and the recorded hash.
fn split_hash(line: &[u8]) -> Option<(Vec<u8>, String)> {
    const SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;
    if line.len() < SUFFIX_LEN {
        return None;
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let hash = suffix.strip_prefix(b",\"hash\":\"")?.strip_suffix(b"\"}")?;
    let hash = std::str::from_utf8(hash).ok()?;
    if !hash
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut preimage = body.to_vec();
    preimage.push(b'}');
    Some((preimage, hash.to_string()))
}

/// Reads the last complete line; truncates a torn tail (a crash mid-write) first.
fn recover_tail(path: &Path, file: &mut File) -> Result<Option<(u64, String)>, AuditError> {
    let io = |e: std::io::Error| AuditError::Io {
        path: path.into(),
        what: e.to_string(),
    };
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(None);
    }
    let window = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - window)).map_err(io)?;
    let mut tail = Vec::with_capacity(window as usize);
    file.take(window).read_to_end(&mut tail).map_err(io)?;
    let complete = match tail.iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None if window == len => 0,
        None => {
            return Err(AuditError::Io {
                path: path.into(),
                what: "last line longer than 1 MiB".into(),
            })
        }
    };
    if complete < tail.len() {
        let keep = len - (tail.len() - complete) as u64;
        tracing::warn!(path = %path.display(), dropped_bytes = tail.len() - complete,
            "audit log ends in a torn line (crash mid-write); truncating it");
        file.set_len(keep).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    let body = &tail[..complete];
    let Some(body) = body.strip_suffix(b"\n") else {
        return Ok(None);
    };
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let last = &body[start..];
    let bad = |what: String| AuditError::Io {
        path: path.into(),
        what: format!("last line {what}; run `nodecrypt-keybroker audit verify`"),
    };
    let (preimage, hash) = split_hash(last).ok_or_else(|| bad("has no hash".into()))?;
    let parsed: Line =
        serde_json::from_slice(&preimage).map_err(|e| bad(format!("does not parse ({e})")))?;
    Ok(Some((parsed.seq, hash)))
}

/// A batch that already holds this many calls is written at once, never held for the
/// commit delay: its fsync (about 100 µs of CPU on this VM) is already shared this many
/// ways, about 3 µs each, so holding it longer buys only latency. MySQL's
/// `binlog_group_commit_sync_no_delay_count` is the same rule. It matters most when the
/// calls move together (many callers in a closed loop): a large batch answered at once
/// comes back at once, and holding it waited for callers who were all there already.
pub const NO_DELAY_BATCH: usize = 32;

/// The writer thread's state: the file and the tail of the chain written to it.
struct Writer {
    rx: mpsc::Receiver<Job>,
    file: File,
    path: PathBuf,
    fsync: bool,
    commit_delay: Duration,
    /// The sequence number and hash of the last line written.
    seq: u64,
    prev: String,
    /// The length of the log's whole lines: a failed batch is cut back to it.
    len: u64,
    batches: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer thread.
    fn spawn(self) -> Result<(), AuditError> {
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || self.run())
            .map(drop)
            .map_err(|e| AuditError::Io {
                path: PathBuf::new(),
                what: e.to_string(),
            })
    }

    /// Whether a batch that `waiting` calls wait on is held open for the commit delay.
    /// Group commit: an fsync costs this thread about as much CPU as a whole key fetch,
    /// and under load one that has just finished leaves only the few calls that came in
    /// during it, so hold the batch open a little for one fsync to answer many. A lone
    /// caller (an idle broker, one boot-time unlock) is not held, nor is a batch that
    /// already shares its fsync [`NO_DELAY_BATCH`] ways.
    fn holds(&self, waiting: usize) -> bool {
        self.fsync && waiting > 1 && waiting < NO_DELAY_BATCH && !self.commit_delay.is_zero()
    }

    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(first) = self.rx.blocking_recv() {
            batch.push(first);
            take_waiting(&mut self.rx, &mut batch);
            if self.holds(batch.len()) {
                std::thread::sleep(self.commit_delay);
                take_waiting(&mut self.rx, &mut batch);
            }
            let outcome = self.write(&batch, &mut buf);
            for (event, reply) in batch.drain(..) {
                // Dropped before the reply: the caller still holds its own references to
                // the shared strings (volume id, peer), so their last reference and the
                // free stay on its thread. A refusal's detail, owned by the event, is
                // freed here.
                drop(event);
                let _ = reply.send(outcome.clone());
            }
        }
    }

    /// Writes (and with fsync, syncs) one line per job, chained; on failure cuts off
    /// whatever part of the batch reached the file.
    fn write(&mut self, batch: &[Job], buf: &mut Vec<u8>) -> Result<(), String> {
        buf.clear();
        let (mut s, mut p) = (self.seq, self.prev.clone());
        for (event, _) in batch {
            s += 1;
            let time = crate::now_rfc3339();
            let line = LineRef {
                seq: s,
                time: &time,
                event,
                prev: &p,
            };
            let start = buf.len();
            serde_json::to_writer(&mut *buf, &line).expect("audit line serialises");
            p = sha256_hex(&buf[start..]);
            buf.pop(); // the closing brace; the hash field closes the object
            buf.extend_from_slice(b",\"hash\":\"");
            buf.extend_from_slice(p.as_bytes());
            buf.extend_from_slice(b"\"}\n");
        }
        let mut written = self.file.write_all(buf);
        if written.is_ok() && self.fsync {
            written = self.file.sync_data();
        }
        match written {
            Ok(()) => {
                (self.seq, self.prev) = (s, p);
                self.len += buf.len() as u64;
                self.batches.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let path = self.path.display();
                tracing::error!(path = %path, error = %e, "audit write failed");
                // Cut off whatever part of the batch reached the file (all of it, if only
                // the fsync failed): the next batch reuses these sequence numbers, so the
                // chain stays whole.
                if let Err(t) = self.file.set_len(self.len) {
                    tracing::error!(path = %path, error = %t,
                        "cannot cut a failed audit batch off the log; `audit verify` will name it");
                }
                Err(e.to_string())
            }
        }
    }
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path` and starts its writer thread.
    /// With `fsync`, each batch is fsynced before its callers are answered, and a batch
    /// that more than one caller is already waiting on (but fewer than
    /// [`NO_DELAY_BATCH`]) is held open for up to `commit_delay` first, so that the calls
    /// arriving meanwhile share its fsync (zero: never held).
    pub fn open(path: &Path, fsync: bool, commit_delay: Duration) -> Result<Self, AuditError> {
        let (log, writer) = Self::prepare(path, fsync, commit_delay)?;
        writer.spawn()?;
        Ok(log)
    }

    /// Opens the log and returns its handle and its writer, not yet started: calls
    /// recorded before [`Writer::spawn`] wait in its queue.
    fn prepare(
        path: &Path,
        fsync: bool,
        commit_delay: Duration,
    ) -> Result<(Self, Writer), AuditError> {
        let io = |e: std::io::Error| AuditError::Io {
            path: path.into(),
            what: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let (seq, prev) = recover_tail(path, &mut file)?.unwrap_or((0, GENESIS.to_string()));
        let len = file.metadata().map_err(io)?.len();
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let batches = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            rx,
            file,
            path: path.to_path_buf(),
            fsync,
            commit_delay,
            seq,
            prev,
            len,
            batches: batches.clone(),
        };
        Ok((Self { tx, batches }, writer))
    }

    /// How many batches (one write and, with fsync, one fsync each) have been written.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Records `event` and returns once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(what)) => Err(AuditError::Io {
                path: PathBuf::from("audit log"),
                what,
            }),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

/// Verifies the chain of the log at `path`; returns the number of lines.
pub fn verify(path: &Path) -> Result<u64, VerifyError> {
    let file = File::open(path).map_err(|e| VerifyError {
        line: 0,
        what: format!("{}: {e}", path.display()),
    })?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS.to_string();
    let mut expected_seq = None;
    let mut n = 0u64;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let read = reader
            .read_until(b'\n', &mut raw)
            .map_err(|e| VerifyError {
                line: n + 1,
                what: e.to_string(),
            })?;
        if read == 0 {
            return Ok(n);
        }
        n += 1;
        let bad = |what: String| VerifyError { line: n, what };
        let Some(line) = raw.strip_suffix(b"\n") else {
            return Err(bad("torn: no end of line".into()));
        };
        let (preimage, hash) =
            split_hash(line).ok_or_else(|| bad("has no trailing hash field".into()))?;
        let parsed: Line =
            serde_json::from_slice(&preimage).map_err(|e| bad(format!("does not parse: {e}")))?;
        if sha256_hex(&preimage) != hash {
            return Err(bad(
                "content does not match its hash: the line was edited".into()
            ));
        }
        if parsed.prev != prev {
            return Err(bad(format!(
                "hash chain broken: prev is {} but the previous line's hash is {prev} \
                 (a line before it was removed, inserted or reordered)",
                parsed.prev
            )));
        }
        if let Some(e) = expected_seq {
            if parsed.seq != e {
                return Err(bad(format!(
                    "sequence {} where {e} was expected",
                    parsed.seq
                )));
            }
        }
        expected_seq = Some(parsed.seq + 1);
        prev = hash;
    }
}

#[cfg(test)]
mod tests;
