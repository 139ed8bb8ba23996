//! The audit log's chain, group commit and failure handling.
use super::*;

fn ev(rpc: &'static str) -> AuditEvent {
    AuditEvent {
        peer: "spiffe://t/node/n1".into(),
        peer_addr: "127.0.0.1:1".into(),
        rpc,
        volume_id: "v".into(),
        version: Some(1),
        result: "OK",
        detail: None,
    }
}

const NO_DELAY: Duration = Duration::ZERO;

#[tokio::test]
async fn a_log_that_cannot_be_written_refuses_every_record() {
    // /dev/full accepts the open and fails every write (ENOSPC): each call is told,
    // so the service answers UNAVAILABLE instead of serving a key unaudited.
    let log = AuditLog::open(Path::new("/dev/full"), true, NO_DELAY).unwrap();
    for _ in 0..3 {
        let e = log.record(ev("GetVolumeKey")).await.unwrap_err();
        assert!(matches!(e, AuditError::Io { .. }), "{e}");
    }
}

#[tokio::test]
async fn chain_survives_reopen_and_detects_edits_and_torn_tails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    {
        let log = AuditLog::open(&path, true, NO_DELAY).unwrap();
        for rpc in ["Rpc0", "Rpc1", "Rpc2", "Rpc3", "Rpc4"] {
            log.record(ev(rpc)).await.unwrap();
        }
    }
    // A crash mid-write leaves a torn line: reopening truncates it and continues the chain.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":6,\"ti").unwrap();
    drop(f);
    assert_eq!(verify(&path).unwrap_err().line, 6);
    {
        let log = AuditLog::open(&path, false, NO_DELAY).unwrap();
        log.record(ev("After")).await.unwrap();
    }
    assert_eq!(verify(&path).unwrap(), 6);

    let text = fs::read_to_string(&path).unwrap();
    let edited = text.replacen("Rpc2", "Rpc9", 1);
    fs::write(&path, edited).unwrap();
    let err = verify(&path).unwrap_err();
    assert_eq!(err.line, 3, "{err}");
    assert!(err.what.contains("edited"), "{err}");

    // Removing a line (and so re-hashing nothing): the chain breaks at the next one.
    let lines: Vec<&str> = text.lines().collect();
    let removed = [&lines[..2], &lines[3..]].concat().join("\n") + "\n";
    fs::write(&path, removed).unwrap();
    let err = verify(&path).unwrap_err();
    assert_eq!(err.line, 3, "{err}");
    assert!(err.what.contains("chain broken"), "{err}");
}

/// Sends 25 pairs of records, the two of a pair together and the pairs 2 ms apart,
/// and returns how many batches they were written in.
async fn batches_for_spaced_pairs(commit_delay: Duration) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, true, commit_delay).unwrap();
    let mut pairs = Vec::new();
    for _ in 0..25 {
        let log = log.clone();
        pairs.push(tokio::spawn(async move {
            let (a, b) = tokio::join!(log.record(ev("A")), log.record(ev("B")));
            a.and(b)
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for p in pairs {
        p.await.unwrap().unwrap();
    }
    assert_eq!(verify(&path).unwrap(), 50);
    log.batches()
}

#[tokio::test]
async fn calls_that_wait_together_share_a_batch_held_open_by_the_commit_delay() {
    // Without a delay each pair is its own batch (an fsync takes well under the 2 ms
    // between pairs); with one, the first batch that more than one call waits on is
    // held open and takes in the pairs arriving meanwhile: a handful of fsyncs.
    let held = batches_for_spaced_pairs(Duration::from_millis(500)).await;
    assert!(held <= 3, "{held} batches with a 500 ms commit delay");
    let unheld = batches_for_spaced_pairs(Duration::ZERO).await;
    assert!(unheld >= 10, "{unheld} batches without a commit delay");
}

#[tokio::test]
async fn a_lone_call_is_never_held_for_the_commit_delay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, true, Duration::from_secs(60)).unwrap();
    let three = async {
        for rpc in ["One", "Two", "Three"] {
            log.record(ev(rpc)).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), three)
        .await
        .expect("a call with nobody else waiting is answered without the 60 s delay");
    assert_eq!(log.batches(), 3);
    assert_eq!(verify(&path).unwrap(), 3);
}

/// Records `n` calls while the writer is not yet running, then starts it, so that it
/// finds all `n` waiting at once. Returns how long they took to be answered from the
/// start, and in how many batches.
async fn answer_queued(n: usize, commit_delay: Duration) -> (Duration, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (log, writer) = AuditLog::prepare(&path, true, commit_delay).unwrap();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move { log.record(ev("Queued")).await })
        })
        .collect();
    while log.tx.max_capacity() - log.tx.capacity() < n {
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    writer.spawn().unwrap();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert_eq!(verify(&path).unwrap(), n as u64);
    (took, log.batches())
}

#[tokio::test]
async fn a_batch_that_shares_its_fsync_enough_ways_is_not_held() {
    let (took, batches) = answer_queued(NO_DELAY_BATCH, Duration::from_secs(60)).await;
    assert_eq!(batches, 1);
    assert!(
        took < Duration::from_secs(10),
        "{NO_DELAY_BATCH} calls waiting together took {took:?}: held for the 60 s delay"
    );
    // One call fewer, and the batch is held for the delay.
    let delay = Duration::from_millis(300);
    let (took, batches) = answer_queued(NO_DELAY_BATCH - 1, delay).await;
    assert_eq!(batches, 1);
    assert!(
        took >= delay,
        "{} calls took {took:?}: not held",
        NO_DELAY_BATCH - 1
    );
}

/// A tmpfs of `pages` pages mounted on a temporary directory (root only), unmounted
/// on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(pages: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={}k", pages * 4),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_batch_the_disk_cannot_take_is_cut_off_and_the_chain_goes_on() {
    // Two pages: the log's first page, and one the filler takes.
    let fs_ = TinyFs::mount(2);
    let path = fs_.dir.path().join("audit.log");
    let log = AuditLog::open(&path, true, NO_DELAY).unwrap();
    log.record(ev("First")).await.unwrap();
    let whole = fs::metadata(&path).unwrap().len();
    let filler = fs_.dir.path().join("filler");
    fs::write(&filler, vec![0u8; 4096]).unwrap();

    // A line longer than what is left of the log's page: part of it is written, then
    // ENOSPC. The caller is told, and the part that reached the file is cut off.
    let mut big = ev("Big");
    big.detail = Some("x".repeat(6000));
    let e = log.record(big).await.unwrap_err();
    assert!(e.to_string().contains("No space left"), "{e}");
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        whole,
        "the torn batch is cut off"
    );
    assert_eq!(verify(&path).unwrap(), 1);

    // Space again: the next line takes the sequence number the failed one did not
    // keep, and the chain verifies, also after a reopen.
    fs::remove_file(&filler).unwrap();
    log.record(ev("Second")).await.unwrap();
    assert_eq!(verify(&path).unwrap(), 2);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.lines().nth(1).unwrap().contains("\"seq\":2"), "{text}");
    assert!(!text.contains("Big"), "{text}");
    drop(log);
    let log = AuditLog::open(&path, true, NO_DELAY).unwrap();
    log.record(ev("Third")).await.unwrap();
    assert_eq!(verify(&path).unwrap(), 3);
}
