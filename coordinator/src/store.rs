//! The coordinator's state store: what a restarted coordinator needs to know every job again.
//!
//! One value per job, keyed by the job id: its [`JobRecord`] (history and progress), the resolved
//! spec, the metrics of its finished epochs and the facts the rendezvous settled (training-set
//! size, number of workers). [`StateStore`] is deliberately small — put, delete, load everything —
//! so that an etcd implementation maps one job to one key (`<prefix>/jobs/<id>`) with the same
//! JSON value.
//!
//! - [`FileStore`] is the embedded default, no server: `<dir>/jobs/<id>.json`, each written
//!   atomically (a uniquely named temp file in the same directory, fsync, rename, fsync of the
//!   directory), so a crash leaves the old or the new version of a job, never a torn one. The
//!   directory is locked while a store is open: two coordinators never share one.
//! - [`MemoryStore`] keeps the same JSON in memory, for tests and for coordinators whose jobs need
//!   not outlive them (`thaw launch`).
//!
//! Only the coordinator writes to the state store. This module knows nothing of rendezvous,
//! workers or the network; job ids are checked to be plain file names before any path is built.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::job::JobRecord;
use crate::metrics::EpochMetrics;

/// The longest job id a store accepts, in bytes (file names are limited to 255).
pub const MAX_JOB_ID_LEN: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid job id {id:?} for the state store: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("state store: cannot {what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("state store: cannot encode job `{id}`: {source}")]
    Encode { id: String, source: serde_json::Error },
    #[error("state directory {} is in use by another coordinator (it holds {})", dir.display(), dir.join(LOCK_FILE).display())]
    InUse { dir: PathBuf },
    #[error("state store: cannot {what}: etcd is unavailable: {reason}")]
    Unavailable { what: String, reason: String },
    #[error("state store: write refused, this coordinator is not the leader: {reason}")]
    Fenced { reason: String },
    #[error("state store: job `{id}` is {bytes} bytes, over the {max}-byte limit of one etcd value")]
    TooLarge { id: String, bytes: usize, max: usize },
}

impl StoreError {
    /// Whether trying again may succeed: I/O can recover (space freed, disk back); a bad id, an
    /// unencodable job or a directory held by another coordinator will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Unavailable { .. })
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

/// Checks that `id` is usable as a key and a file name: 1 to [`MAX_JOB_ID_LEN`] bytes of
/// `[A-Za-z0-9._-]`, and not `.` or `..`. The spec's name rules already keep job ids inside this
/// set; the store checks again so that no id can ever reach outside its directory.
pub fn validate_job_id(id: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| Err(StoreError::InvalidId { id: id.to_string(), reason: reason.to_string() });
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_JOB_ID_LEN {
        return bad(&format!("longer than {MAX_JOB_ID_LEN} bytes"));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(&format!("{c:?} is not allowed; use letters, digits, '.', '_' and '-'"));
    }
    if id == "." || id == ".." {
        return bad("not a file name");
    }
    Ok(())
}

/// Everything stored for one job. The key is `record.job_id()`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    /// History and progress; checked on load (the history must be a legal path).
    pub record: JobRecord,
    /// The resolved spec (absolute paths), as the coordinator accepted it.
    pub spec_toml: String,
    /// Metrics of the finished epochs, in the order reported.
    #[serde(default)]
    pub metrics: Vec<EpochMetrics>,
    /// The training-set size the workers agreed on; `None` before the first join.
    #[serde(default)]
    pub num_samples: Option<u64>,
    /// Workers of the group the rendezvous formed; 0 before it closed.
    #[serde(default)]
    pub workers: u32,
    /// The group's generation (re-forms + 1) and the failures counted against `max_restarts`.
    #[serde(default)]
    pub generation: u32,
    #[serde(default)]
    pub restarts: u32,
    /// What a coordinator that takes over needs to carry on with a live job (absent for the
    /// jobs of older versions, which are then failed on restore as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveState>,
    /// The credential its workers present to join (when the coordinator checks credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_token: Option<String>,
    /// The secret its ring keys derive from (empty for jobs of older versions: a new one is made).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ring_secret: String,
}

/// The durable part of a running job's group: membership and where its generation started. The
/// rest (heartbeat times, a regroup in progress, newcomers waiting) is rebuilt by a coordinator
/// that takes over: heartbeats start afresh, and survivors of an unfinished regroup join again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// Members of the current generation, by rank.
    pub members: Vec<crate::rendezvous::Member>,
    /// The generation's starting cursor (epoch, world, steps done, cut).
    pub cursor: crate::plan::EpochCursor,
    /// The rank whose state the generation started from.
    pub source: u32,
    /// The model's layer groups the workers reported (the schedule is expanded against them).
    pub groups: Vec<String>,
    /// The NCCL unique id handed to the current generation (empty for the ring).
    #[serde(default)]
    pub nccl_unique_id: Vec<u8>,
    /// A resumed job's checkpoint and cursor, for workers that join its first generation.
    #[serde(default)]
    pub resume_from: Option<String>,
    #[serde(default)]
    pub resume_cursor: Option<crate::plan::EpochCursor>,
}

/// Where a coordinator keeps its jobs. Implementations are atomic per job: after a crash, a job
/// reads back as one of the values put, never a mixture.
pub trait StateStore: Send + Sync {
    /// Creates or replaces the job `rec.record.job_id()`.
    fn put_job(&self, rec: &StoredJob) -> Result<(), StoreError>;
    /// Forgets a job; forgetting an unknown job is not an error.
    fn delete_job(&self, id: &str) -> Result<(), StoreError>;
    /// Every job stored, in id order. Values that cannot be read back as a job are skipped and
    /// logged, never fatal: one bad job does not keep a coordinator from starting.
    fn load_all(&self) -> Result<Vec<StoredJob>, StoreError>;
}

pub(crate) fn encode(rec: &StoredJob) -> Result<(String, Vec<u8>), StoreError> {
    let id = rec.record.job_id().to_string();
    validate_job_id(&id)?;
    let mut bytes = serde_json::to_vec_pretty(rec).map_err(|source| StoreError::Encode { id: id.clone(), source })?;
    bytes.push(b'\n');
    Ok((id, bytes))
}

/// Decodes the value stored under `id`; the record inside must carry the same id.
pub(crate) fn decode(id: &str, bytes: &[u8]) -> Result<StoredJob, String> {
    let job: StoredJob = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if job.record.job_id() != id {
        return Err(format!("it holds job `{}`, not `{id}`", job.record.job_id()));
    }
    Ok(job)
}

/// An in-memory store with the same encoding as [`FileStore`]. Clones share their contents, so a
/// test can keep a handle to what a coordinator wrote.
#[derive(Clone, Default)]
pub struct MemoryStore {
    jobs: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("jobs", &self.jobs().len()).finish()
    }
}

impl StateStore for MemoryStore {
    fn put_job(&self, rec: &StoredJob) -> Result<(), StoreError> {
        let (id, bytes) = encode(rec)?;
        self.jobs().insert(id, bytes);
        Ok(())
    }

    fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        validate_job_id(id)?;
        self.jobs().remove(id);
        Ok(())
    }

    fn load_all(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut out = Vec::new();
        for (id, bytes) in self.jobs().iter() {
            match decode(id, bytes) {
                Ok(job) => out.push(job),
                Err(reason) => tracing::warn!(job = %id, %reason, "skipping a stored job that does not parse"),
            }
        }
        Ok(out)
    }
}

const LOCK_FILE: &str = "LOCK";
const JOBS_DIR: &str = "jobs";
const JOB_EXT: &str = ".json";
const TEMP_EXT: &str = ".tmp";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file in the jobs directory that could not be read back as a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// What [`FileStore::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub jobs: Vec<StoredJob>,
    pub skipped: Vec<Skipped>,
}

/// The embedded store: `<dir>/jobs/<id>.json`, one atomically written file per job, and
/// `<dir>/LOCK`, locked for as long as the store is open.
pub struct FileStore {
    dir: PathBuf,
    jobs: PathBuf,
    /// Held for the store's lifetime; the OS releases it when the process dies, even by SIGKILL.
    _lock: File,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.dir).finish()
    }
}

impl FileStore {
    /// Opens (creating it if needed) the state directory `dir` and locks it. Temp files left by a
    /// writer that crashed are removed: under the lock, nobody else can be writing them.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        let jobs = dir.join(JOBS_DIR);
        fs::create_dir_all(&jobs).map_err(io_err("create", &jobs))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::InUse { dir }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let store = FileStore { dir, jobs, _lock: lock };
        for entry in fs::read_dir(&store.jobs).map_err(io_err("list", &store.jobs))? {
            let entry = entry.map_err(io_err("list", &store.jobs))?;
            if entry.file_name().to_str().is_some_and(|n| n.ends_with(TEMP_EXT)) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(path = %path.display(), "removed a temp file left by a crash"),
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temp file"),
                }
            }
        }
        Ok(store)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds job `id` (which must be valid).
    pub fn job_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        validate_job_id(id)?;
        Ok(self.jobs.join(format!("{id}{JOB_EXT}")))
    }

    /// Every job file that parses, and the files that do not, with the reason. Temp files are
    /// ignored; a file that cannot be read at all is an error (the directory needs fixing), not a
    /// skip.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        let mut paths = Vec::new();
        for entry in fs::read_dir(&self.jobs).map_err(io_err("list", &self.jobs))? {
            let entry = entry.map_err(io_err("list", &self.jobs))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                loaded.skipped.push(Skipped { path, reason: "the file name is not UTF-8".into() });
                continue;
            };
            if name.ends_with(TEMP_EXT) {
                continue;
            }
            let Some(id) = name.strip_suffix(JOB_EXT) else {
                loaded.skipped.push(Skipped { path, reason: format!("not a `<job id>{JOB_EXT}` file") });
                continue;
            };
            if let Err(e) = validate_job_id(id) {
                loaded.skipped.push(Skipped { path, reason: e.to_string() });
                continue;
            }
            paths.push((id.to_string(), path));
        }
        paths.sort();
        for (id, path) in paths {
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            match decode(&id, &bytes) {
                Ok(job) => loaded.jobs.push(job),
                Err(reason) => loaded.skipped.push(Skipped { path, reason }),
            }
        }
        Ok(loaded)
    }

    /// Writes `bytes` to `path` atomically: a temp file with a name unique to this process and
    /// call, fsync, rename over `path`, fsync of the directory. On error the temp file is removed
    /// and `path` is untouched.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("job");
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.jobs.join(format!(".{name}.{}-{n}{TEMP_EXT}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err("create", &tmp))?;
            f.write_all(bytes).map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("fsync", &tmp))?;
            drop(f);
            fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Makes a rename or removal in the jobs directory durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.jobs).and_then(|d| d.sync_all()).map_err(io_err("fsync", &self.jobs))
    }
}

impl StateStore for FileStore {
    fn put_job(&self, rec: &StoredJob) -> Result<(), StoreError> {
        let (id, bytes) = encode(rec)?;
        let path = self.job_path(&id)?;
        self.write_atomic(&path, &bytes)
    }

    fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        let path = self.job_path(id)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn load_all(&self) -> Result<Vec<StoredJob>, StoreError> {
        let loaded = self.load()?;
        for s in &loaded.skipped {
            tracing::warn!(path = %s.path.display(), reason = %s.reason, "skipping a job file that cannot be read back");
        }
        Ok(loaded.jobs)
    }
}

/// `f64` as a JSON number, or `"NaN"`, `"inf"`, `"-inf"` for what a JSON number cannot hold.

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, samples_done: u64) -> StoredJob {
        let mut record = JobRecord::new(id, 1_000).unwrap();
        record.start_rendezvous("waiting for 1..1 workers", 1_001).unwrap();
        record.start_running("rendezvous closed with 1 workers", 1_002).unwrap();
        record.record_progress(1, 3, samples_done, 1_003).unwrap();
        StoredJob {
            record,
            spec_toml: format!("name = \"{id}\"\n"),
            metrics: vec![EpochMetrics {
                epoch: 1,
                // Parsed back 1 ulp off without serde_json's `float_roundtrip`.
                train_loss: 1.7546217903306627,
                train_acc: 1.0 / 3.0,
                val_loss: f64::NAN,
                val_acc: f64::INFINITY,
                images: 256,
                skipped: 1,
                seconds: f64::NEG_INFINITY,
                data_wait: 1e-300,
            }],
            num_samples: Some(256),
            generation: 2,
            restarts: 1,
            workers: 2,
            live: Some(LiveState {
                members: vec![crate::rendezvous::Member {
                    rank: 0,
                    worker_id: "w-0123".into(),
                    collective_addr: "127.0.0.1:4000".into(),
                }],
                cursor: crate::plan::EpochCursor {
                    epoch: 1,
                    world: 2,
                    step: 5,
                    cut: Some(crate::plan::Cut { base_world: 3, base_steps: 2, offset: 0 }),
                },
                source: 1,
                groups: vec!["features".into(), "head".into()],
                nccl_unique_id: vec![1, 2, 3],
                resume_from: None,
                resume_cursor: None,
            }),
            worker_token: Some("0123abcd".into()),
            ring_secret: "feedface".into(),
        }
    }

    /// Equality that treats NaN as equal to itself.
    fn same(a: &StoredJob, b: &StoredJob) -> bool {
        let bits = |j: &StoredJob| {
            j.metrics
                .iter()
                .map(|m| [m.train_loss, m.train_acc, m.val_loss, m.val_acc, m.seconds, m.data_wait].map(f64::to_bits))
                .collect::<Vec<_>>()
        };
        (&a.record, &a.spec_toml, a.num_samples, a.workers) == (&b.record, &b.spec_toml, b.num_samples, b.workers)
            && bits(a) == bits(b)
    }

    #[test]
    fn round_trip_through_both_stores() {
        let dir = tempfile::tempdir().unwrap();
        let file = FileStore::open(dir.path().join("state")).unwrap();
        let mem = MemoryStore::new();
        let stores: [&dyn StateStore; 2] = [&file, &mem];
        for store in stores {
            store.put_job(&job("b.2", 64)).unwrap();
            store.put_job(&job("a_1", 32)).unwrap();
            store.put_job(&job("a_1", 48)).unwrap();
            let all = store.load_all().unwrap();
            assert_eq!(all.len(), 2);
            assert!(same(&all[0], &job("a_1", 48)), "the latest put wins: {:?}", all[0]);
            assert!(same(&all[1], &job("b.2", 64)), "{:?}", all[1]);
            store.delete_job("a_1").unwrap();
            store.delete_job("a_1").unwrap();
            store.delete_job("never-there").unwrap();
            let ids: Vec<String> = store.load_all().unwrap().iter().map(|j| j.record.job_id().to_string()).collect();
            assert_eq!(ids, ["b.2"]);
        }
        let text = fs::read_to_string(file.job_path("b.2").unwrap()).unwrap();
        assert!(text.contains("\"val_loss\": \"NaN\"") && text.contains("\"seconds\": \"-inf\""), "{text}");
        drop(file);
        let reopened = FileStore::open(dir.path().join("state")).unwrap();
        assert!(same(&reopened.load_all().unwrap()[0], &job("b.2", 64)));
    }

    #[test]
    fn leftover_temp_files_and_torn_files_do_not_break_loading() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.put_job(&job("good", 1)).unwrap();
        store.put_job(&job("torn", 2)).unwrap();
        let jobs = dir.path().join("jobs");
        // A crash between create and rename leaves a temp file; a writer that skipped the temp
        // file would leave a truncated one. Neither may hide the good job.
        let full = fs::read(store.job_path("torn").unwrap()).unwrap();
        fs::write(jobs.join(".good.json.999-0.tmp"), &full[..full.len() / 3]).unwrap();
        fs::write(store.job_path("torn").unwrap(), &full[..full.len() / 2]).unwrap();
        fs::write(jobs.join("notes.txt"), "hello").unwrap();
        fs::write(jobs.join("other.json"), serde_json::to_vec(&job("good", 1)).unwrap()).unwrap();

        let loaded = store.load().unwrap();
        let ids: Vec<&str> = loaded.jobs.iter().map(|j| j.record.job_id()).collect();
        assert_eq!(ids, ["good"]);
        assert!(same(&loaded.jobs[0], &job("good", 1)));
        let skipped: BTreeMap<String, String> = loaded
            .skipped
            .iter()
            .map(|s| (s.path.file_name().unwrap().to_string_lossy().into_owned(), s.reason.clone()))
            .collect();
        assert_eq!(skipped.keys().collect::<Vec<_>>(), ["notes.txt", "other.json", "torn.json"], "{skipped:?}");
        assert!(skipped["torn.json"].contains("EOF"), "{skipped:?}");
        assert!(skipped["other.json"].contains("holds job `good`, not `other`"), "{skipped:?}");
        assert_eq!(store.load_all().unwrap().len(), 1);

        // Rewriting the torn job repairs it; reopening clears the temp file.
        store.put_job(&job("torn", 3)).unwrap();
        assert_eq!(store.load().unwrap().jobs.len(), 2);
        drop(store);
        FileStore::open(dir.path()).unwrap();
        assert!(!jobs.join(".good.json.999-0.tmp").exists());
    }

    #[test]
    fn ids_that_are_not_plain_file_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("s")).unwrap();
        let long = "x".repeat(MAX_JOB_ID_LEN + 1);
        for id in ["../evil", "a/b", "..", ".", "", "a\\b", "sp ace", "é", long.as_str()] {
            let err = store.delete_job(id).unwrap_err();
            assert!(matches!(err, StoreError::InvalidId { .. }), "{id:?}: {err}");
            assert!(!err.is_retryable());
            let mut rec = job("ok", 1);
            let json = serde_json::to_string(&rec).unwrap().replace("\"job_id\":\"ok\"", &format!("\"job_id\":{id:?}"));
            if let Ok(r) = serde_json::from_str::<StoredJob>(&json) {
                rec = r;
                let err = store.put_job(&rec).unwrap_err();
                assert!(err.to_string().starts_with(&format!("invalid job id {id:?}")), "{err}");
                assert!(MemoryStore::new().put_job(&rec).is_err());
            }
        }
        assert!(!dir.path().join("evil.json").exists());
        let names: Vec<_> = fs::read_dir(dir.path().join("s/jobs")).unwrap().collect();
        assert!(names.is_empty(), "{names:?}");
        for id in ["a", "A-b_c.d", "..x", "x..y", ".hidden"] {
            validate_job_id(id).unwrap();
        }
    }

    #[test]
    fn concurrent_puts_leave_one_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        store.put_job(&job("hot", t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let loaded = store.load().unwrap();
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.jobs.len(), 1);
        let done = loaded.jobs[0].record.progress().samples_done;
        assert!(done % 100 == 19, "one thread's last write wins, got {done}");
        let left: Vec<_> = fs::read_dir(dir.path().join("jobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["hot.json"], "no temp file left behind");
    }

    #[test]
    fn a_state_dir_serves_one_coordinator_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = FileStore::open(dir.path()).unwrap();
        let err = FileStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("in use by another coordinator"), "{err}");
        drop(first);
        FileStore::open(dir.path()).unwrap();
    }
}
