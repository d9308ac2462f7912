//! Cache records and their storage: which worker refs hold the outputs of
//! a vertex with a given cache key, and beside them the build history and
//! step records (what went into a step's key, for `--explain-cache`).
//!
//! A [`CacheRecord`] is one result (a vertex run once). Several cache keys
//! may lead to it: the definition ("fast") key of the run that produced it,
//! its content key, and fast keys of later builds that matched it by
//! content. [`CacheStore`] is the storage seam; [`RedbStore`] keeps records
//! in a redb database (crash-safe: every change is one committed
//! transaction, so a killed daemon leaves either the whole record or none),
//! [`MemoryStore`] keeps them in memory for tests.

use crate::Error;
use crate::explain::StepRecord;
use crate::history::{HISTORY_MAX, HistoryRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One cached result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CacheRecord {
    /// Record id (the first key it was stored under).
    pub id: String,
    /// Address of the worker holding the refs.
    pub worker: String,
    /// One worker ref per output (empty = scratch).
    pub refs: Vec<String>,
    /// One cache key per output, what downstream vertices key on.
    pub output_keys: Vec<String>,
    /// Every cache key leading to this record.
    pub links: Vec<String>,
    /// The vertex name, for `du`.
    pub description: String,
    /// Unix nanoseconds.
    pub created: i64,
    pub last_used: i64,
    pub usage_count: i64,
    /// Bytes of the output snapshots' own diffs, once measured.
    pub size: Option<i64>,
}

/// Unix nanoseconds now.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Storage of cache records and the keys leading to them.
pub trait CacheStore: Send + Sync + 'static {
    /// The record a key leads to.
    fn get(&self, key: &str) -> Result<Option<CacheRecord>, Error>;
    /// Stores `record` (by its id) and makes every key in `record.links`
    /// lead to it, in one transaction.
    fn put(&self, record: &CacheRecord) -> Result<(), Error>;
    /// Adds `key` to the links of record `id` and bumps its use.
    fn link(&self, id: &str, key: &str) -> Result<(), Error>;
    /// Marks record `id` used now.
    fn touch(&self, id: &str) -> Result<(), Error>;
    /// Removes record `id` and every key leading to it.
    fn remove(&self, id: &str) -> Result<(), Error>;
    /// Every record.
    fn list(&self) -> Result<Vec<CacheRecord>, Error>;
    /// Records the measured size of record `id`.
    fn set_size(&self, id: &str, size: i64) -> Result<(), Error>;
    /// Stores a finished build, dropping the oldest beyond [`HISTORY_MAX`].
    fn put_history(&self, rec: &HistoryRecord) -> Result<(), Error>;
    /// Every stored build, oldest first.
    fn list_history(&self) -> Result<Vec<HistoryRecord>, Error>;
    /// What went into a step's cache key the last time it ran, by the
    /// step's stable identity (see `explain::shape`).
    fn put_step(&self, shape: &str, rec: &StepRecord) -> Result<(), Error>;
    fn get_step(&self, shape: &str) -> Result<Option<StepRecord>, Error>;
}

fn oldest_first(mut v: Vec<HistoryRecord>) -> Vec<HistoryRecord> {
    v.sort_by(|a, b| (a.created, &a.r#ref).cmp(&(b.created, &b.r#ref)));
    v
}

/// Cache records in memory (tests, or a daemon without a state dir).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryRecords>,
    history: Mutex<BTreeMap<String, HistoryRecord>>,
    steps: Mutex<HashMap<String, StepRecord>>,
}

/// The records of a [`MemoryStore`] and the keys leading to them.
#[derive(Default)]
struct MemoryRecords {
    /// by record id
    records: BTreeMap<String, CacheRecord>,
    /// cache key -> record id
    keys: HashMap<String, String>,
}

impl MemoryStore {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, CacheRecord>, &mut HashMap<String, String>) -> T,
    ) -> T {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let MemoryRecords { records, keys } = &mut *g;
        f(records, keys)
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<CacheRecord>, Error> {
        Ok(self.with(|r, k| k.get(key).and_then(|id| r.get(id)).cloned()))
    }
    fn put(&self, record: &CacheRecord) -> Result<(), Error> {
        self.with(|r, k| {
            for l in &record.links {
                k.insert(l.clone(), record.id.clone());
            }
            r.insert(record.id.clone(), record.clone());
        });
        Ok(())
    }
    fn link(&self, id: &str, key: &str) -> Result<(), Error> {
        self.with(|r, k| {
            if let Some(rec) = r.get_mut(id) {
                if !rec.links.iter().any(|l| l == key) {
                    rec.links.push(key.to_string());
                }
                rec.last_used = unix_nanos();
                rec.usage_count += 1;
                k.insert(key.to_string(), id.to_string());
            }
        });
        Ok(())
    }
    fn touch(&self, id: &str) -> Result<(), Error> {
        self.with(|r, _| {
            if let Some(rec) = r.get_mut(id) {
                rec.last_used = unix_nanos();
                rec.usage_count += 1;
            }
        });
        Ok(())
    }
    fn remove(&self, id: &str) -> Result<(), Error> {
        self.with(|r, k| {
            if let Some(rec) = r.remove(id) {
                for l in rec.links {
                    if k.get(&l).is_some_and(|x| x == id) {
                        k.remove(&l);
                    }
                }
            }
        });
        Ok(())
    }
    fn list(&self) -> Result<Vec<CacheRecord>, Error> {
        Ok(self.with(|r, _| r.values().cloned().collect()))
    }
    fn set_size(&self, id: &str, size: i64) -> Result<(), Error> {
        self.with(|r, _| {
            if let Some(rec) = r.get_mut(id) {
                rec.size = Some(size);
            }
        });
        Ok(())
    }
    fn put_history(&self, rec: &HistoryRecord) -> Result<(), Error> {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.insert(rec.r#ref.clone(), rec.clone());
        let all = oldest_first(h.values().cloned().collect());
        for old in all.iter().take(all.len().saturating_sub(HISTORY_MAX)) {
            h.remove(&old.r#ref);
        }
        Ok(())
    }
    fn list_history(&self) -> Result<Vec<HistoryRecord>, Error> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        Ok(oldest_first(h.values().cloned().collect()))
    }
    fn put_step(&self, shape: &str, rec: &StepRecord) -> Result<(), Error> {
        let mut s = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(shape.to_string(), rec.clone());
        Ok(())
    }
    fn get_step(&self, shape: &str) -> Result<Option<StepRecord>, Error> {
        let s = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        Ok(s.get(shape).cloned())
    }
}

const RECORDS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
const KEYS: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("keys");
const HISTORY: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("history");
const STEPS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("steps");

fn json_err(what: &str, key: &str) -> impl Fn(serde_json::Error) -> Error {
    let id = format!("{what} {key}");
    move |e| Error::CacheRecord {
        id: id.clone(),
        message: e.to_string(),
    }
}

/// Cache records in a redb database file.
pub struct RedbStore {
    db: std::sync::Arc<redb::Database>,
    /// A record was committed without an fsync since the last durable commit.
    unsynced: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The group-commit thread, stopped and joined when the store closes, so
    /// the database is closed (and can be opened again) once the store is gone.
    committer: Option<GroupCommitter>,
}

struct GroupCommitter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Some(c) = self.committer.take() {
            c.stop.store(true, std::sync::atomic::Ordering::Release);
            c.thread.thread().unpark();
            let _ = c.thread.join();
        }
        if self.unsynced.load(std::sync::atomic::Ordering::Acquire)
            && let Err(e) = durable_commit(&self.db)
        {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "durable commit of cache records on close");
        }
    }
}

/// An empty durable commit: it makes every commit before it durable.
fn durable_commit(db: &redb::Database) -> Result<(), redb::Error> {
    db.begin_write()?.commit()?;
    Ok(())
}

/// How soon after a step's record a durable commit covers it (group commit):
/// a daemon killed within this window loses the newest records (never a part
/// of one); the steps they describe run again.
const GROUP_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Commits durably every [`GROUP_COMMIT`] while records were committed without
/// an fsync; ends when told to stop (the store closing).
fn spawn_group_committer(
    db: std::sync::Arc<redb::Database>,
    unsynced: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<GroupCommitter> {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("cache-commit".into())
        .spawn(move || {
            loop {
                std::thread::park_timeout(GROUP_COMMIT);
                if stopped.load(Ordering::Acquire) {
                    return;
                }
                if !unsynced.swap(false, Ordering::AcqRel) {
                    continue;
                }
                if let Err(e) = durable_commit(&db) {
                    unsynced.store(true, Ordering::Release);
                    tracing::warn!(error = %kiln_proto::status::Chain(&e), "durable commit of cache records");
                }
            }
        });
    match spawned {
        Ok(thread) => Some(GroupCommitter { stop, thread }),
        Err(e) => {
            tracing::warn!(error = %kiln_proto::status::Chain(&e), "start the cache commit thread");
            None
        }
    }
}

fn db_err(op: &'static str) -> impl Fn(redb::Error) -> Error {
    move |source| Error::CacheStore {
        op,
        source: Box::new(source),
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<CacheRecord, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::CacheRecord {
        id: id.to_string(),
        message: e.to_string(),
    })
}

fn encode(rec: &CacheRecord) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(rec).map_err(|e| Error::CacheRecord {
        id: rec.id.clone(),
        message: e.to_string(),
    })
}

/// Non-durable commits are made durable by the next durable one or when the
/// database closes; a crash before that loses them (never a half of one).
fn set_durability(txn: &mut redb::WriteTransaction, durability: redb::Durability) {
    if let Err(e) = txn.set_durability(durability) {
        tracing::debug!(error = %kiln_proto::status::Chain(&e), "commit stays durable");
    }
}

impl RedbStore {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::CacheStore {
                op: "create dir",
                source: Box::new(e.into()),
            })?;
        }
        let db = redb::Database::create(path).map_err(|e| db_err("open")(e.into()))?;
        let db = std::sync::Arc::new(db);
        let unsynced = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let committer = spawn_group_committer(db.clone(), unsynced.clone());
        let s = RedbStore {
            db,
            unsynced,
            committer,
        };
        s.write("create tables", redb::Durability::Immediate, |_, _| Ok(()))?;
        s.aux_write(
            "create tables",
            HISTORY,
            redb::Durability::Immediate,
            |_| Ok(()),
        )?;
        s.aux_write("create tables", STEPS, redb::Durability::Immediate, |_| {
            Ok(())
        })?;
        Ok(s)
    }

    fn aux_write(
        &self,
        op: &'static str,
        table: redb::TableDefinition<&str, &[u8]>,
        durability: redb::Durability,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let e = db_err(op);
        let mut txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        set_durability(&mut txn, durability);
        {
            let mut t = txn.open_table(table).map_err(|x| e(x.into()))?;
            f(&mut t)?;
        }
        txn.commit().map_err(|x| e(x.into()))
    }

    fn aux_read<T>(
        &self,
        op: &'static str,
        table: redb::TableDefinition<&str, &[u8]>,
        f: impl FnOnce(&redb::ReadOnlyTable<&str, &[u8]>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        use redb::ReadableDatabase;
        let e = db_err(op);
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let t = txn.open_table(table).map_err(|x| e(x.into()))?;
        f(&t)
    }

    fn write<T>(
        &self,
        op: &'static str,
        durability: redb::Durability,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>, &mut redb::Table<&str, &str>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let e = db_err(op);
        let mut txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        set_durability(&mut txn, durability);
        let out = {
            let mut records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
            let mut keys = txn.open_table(KEYS).map_err(|x| e(x.into()))?;
            f(&mut records, &mut keys)?
        };
        txn.commit().map_err(|x| e(x.into()))?;
        if matches!(durability, redb::Durability::None) {
            // after the commit, so the group commit that clears it covers it
            self.unsynced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(out)
    }

    fn update(
        &self,
        op: &'static str,
        id: &str,
        durability: redb::Durability,
        f: impl FnOnce(&mut CacheRecord, &mut redb::Table<&str, &str>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        use redb::ReadableTable;
        let e = db_err(op);
        self.write(op, durability, |records, keys| {
            let rec = match records.get(id).map_err(|x| e(x.into()))? {
                Some(v) => decode(id, v.value())?,
                None => return Ok(()),
            };
            let mut rec = rec;
            f(&mut rec, keys)?;
            records
                .insert(id, encode(&rec)?.as_slice())
                .map_err(|x| e(x.into()))?;
            Ok(())
        })
    }
}

impl CacheStore for RedbStore {
    fn get(&self, key: &str) -> Result<Option<CacheRecord>, Error> {
        use redb::ReadableDatabase;
        let e = db_err("read");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let keys = txn.open_table(KEYS).map_err(|x| e(x.into()))?;
        let Some(id) = keys
            .get(key)
            .map_err(|x| e(x.into()))?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
        match records.get(id.as_str()).map_err(|x| e(x.into()))? {
            Some(v) => decode(&id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn put(&self, record: &CacheRecord) -> Result<(), Error> {
        let e = db_err("put");
        let bytes = encode(record)?;
        // durable within GROUP_COMMIT, so a step does not wait for the disk
        self.write("put", redb::Durability::None, |records, keys| {
            records
                .insert(record.id.as_str(), bytes.as_slice())
                .map_err(|x| e(x.into()))?;
            for l in &record.links {
                keys.insert(l.as_str(), record.id.as_str())
                    .map_err(|x| e(x.into()))?;
            }
            Ok(())
        })
    }

    fn link(&self, id: &str, key: &str) -> Result<(), Error> {
        let e = db_err("link");
        self.update("link", id, redb::Durability::None, |rec, keys| {
            if !rec.links.iter().any(|l| l == key) {
                rec.links.push(key.to_string());
            }
            rec.last_used = unix_nanos();
            rec.usage_count += 1;
            keys.insert(key, id).map_err(|x| e(x.into()))?;
            Ok(())
        })
    }

    fn touch(&self, id: &str) -> Result<(), Error> {
        // usage statistics only (prune order): losing the last ones in a crash is harmless,
        // and a cached step does no fsync
        self.update("touch", id, redb::Durability::None, |rec, _| {
            rec.last_used = unix_nanos();
            rec.usage_count += 1;
            Ok(())
        })
    }

    fn remove(&self, id: &str) -> Result<(), Error> {
        use redb::ReadableTable;
        let e = db_err("remove");
        self.write("remove", redb::Durability::Immediate, |records, keys| {
            let rec = match records.remove(id).map_err(|x| e(x.into()))? {
                Some(v) => decode(id, v.value())?,
                None => return Ok(()),
            };
            for l in &rec.links {
                let points_here = keys
                    .get(l.as_str())
                    .map_err(|x| e(x.into()))?
                    .is_some_and(|v| v.value() == id);
                if points_here {
                    keys.remove(l.as_str()).map_err(|x| e(x.into()))?;
                }
            }
            Ok(())
        })
    }

    fn list(&self) -> Result<Vec<CacheRecord>, Error> {
        use redb::{ReadableDatabase, ReadableTable};
        let e = db_err("list");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let records = txn.open_table(RECORDS).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for item in records.iter().map_err(|x| e(x.into()))? {
            let (k, v) = item.map_err(|x| e(x.into()))?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn set_size(&self, id: &str, size: i64) -> Result<(), Error> {
        self.update("set size", id, redb::Durability::Immediate, |rec, _| {
            rec.size = Some(size);
            Ok(())
        })
    }

    fn put_history(&self, rec: &HistoryRecord) -> Result<(), Error> {
        use redb::{ReadableTable, ReadableTableMetadata};
        let bytes = serde_json::to_vec(rec).map_err(json_err("history", &rec.r#ref))?;
        let e = db_err("put history");
        self.aux_write("put history", HISTORY, redb::Durability::Immediate, |t| {
            t.insert(rec.r#ref.as_str(), bytes.as_slice())
                .map_err(|x| e(x.into()))?;
            let n = t.len().map_err(|x| e(x.into()))? as usize;
            if n > HISTORY_MAX {
                let mut all = Vec::new();
                for item in t.iter().map_err(|x| e(x.into()))? {
                    let (k, v) = item.map_err(|x| e(x.into()))?;
                    if let Ok(r) = serde_json::from_slice::<HistoryRecord>(v.value()) {
                        all.push(r);
                    } else {
                        all.push(HistoryRecord {
                            r#ref: k.value().to_string(),
                            ..Default::default()
                        });
                    }
                }
                for old in oldest_first(all).iter().take(n - HISTORY_MAX) {
                    t.remove(old.r#ref.as_str()).map_err(|x| e(x.into()))?;
                }
            }
            Ok(())
        })
    }

    fn list_history(&self) -> Result<Vec<HistoryRecord>, Error> {
        use redb::ReadableTable;
        let e = db_err("list history");
        self.aux_read("list history", HISTORY, |t| {
            let mut out = Vec::new();
            for item in t.iter().map_err(|x| e(x.into()))? {
                let (k, v) = item.map_err(|x| e(x.into()))?;
                out.push(
                    serde_json::from_slice(v.value()).map_err(json_err("history", k.value()))?,
                );
            }
            Ok(oldest_first(out))
        })
    }

    fn put_step(&self, shape: &str, rec: &StepRecord) -> Result<(), Error> {
        let bytes = serde_json::to_vec(rec).map_err(json_err("step", shape))?;
        let e = db_err("put step");
        // what went into a step's key, for explanations: losing the last ones in a crash
        // only makes a later miss unexplained, and a step does one fsync (its record) not two
        self.aux_write("put step", STEPS, redb::Durability::None, |t| {
            t.insert(shape, bytes.as_slice()).map_err(|x| e(x.into()))?;
            Ok(())
        })
    }

    fn get_step(&self, shape: &str) -> Result<Option<StepRecord>, Error> {
        let e = db_err("get step");
        self.aux_read("get step", STEPS, |t| {
            match t.get(shape).map_err(|x| e(x.into()))? {
                Some(v) => Ok(serde_json::from_slice(v.value()).ok()),
                None => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, links: &[&str]) -> CacheRecord {
        CacheRecord {
            id: id.into(),
            worker: "w".into(),
            refs: vec!["r1".into()],
            output_keys: vec!["o1".into()],
            links: links.iter().map(|s| s.to_string()).collect(),
            created: 1,
            last_used: 1,
            ..Default::default()
        }
    }

    fn exercise(s: &dyn CacheStore) {
        assert_eq!(s.get("k1").expect("get"), None);
        s.put(&record("k1", &["k1", "c1"])).expect("put");
        assert_eq!(
            s.get("c1").expect("get").map(|r| r.refs),
            Some(vec!["r1".to_string()])
        );
        s.link("k1", "k2").expect("link");
        let r = s.get("k2").expect("get").expect("linked");
        assert_eq!((r.id.as_str(), r.usage_count, r.links.len()), ("k1", 1, 3));
        s.set_size("k1", 42).expect("size");
        assert_eq!(
            s.list().expect("list").first().and_then(|r| r.size),
            Some(42)
        );
        s.put(&record("x", &["x"])).expect("put");
        s.remove("k1").expect("remove");
        for k in ["k1", "k2", "c1"] {
            assert_eq!(s.get(k).expect("get"), None, "{k} gone with its record");
        }
        assert_eq!(s.list().expect("list").len(), 1);
        for i in 0..HISTORY_MAX + 2 {
            s.put_history(&HistoryRecord {
                r#ref: format!("b{i}"),
                created: i as i64,
                ..Default::default()
            })
            .expect("history");
        }
        let h = s.list_history().expect("list history");
        assert_eq!(h.len(), HISTORY_MAX, "the oldest go");
        assert_eq!(h[0].r#ref, "b2");
        let step = StepRecord {
            name: "RUN x".into(),
            ..Default::default()
        };
        s.put_step("shape", &step).expect("put step");
        assert_eq!(s.get_step("shape").expect("get"), Some(step));
        assert_eq!(s.get_step("other").expect("get"), None);
    }

    #[test]
    fn memory_store_links_and_removes() {
        exercise(&MemoryStore::default());
    }

    #[test]
    fn redb_store_links_removes_and_persists() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("solver/cache.redb");
        {
            let s = RedbStore::open(&path).expect("open");
            exercise(&s);
        }
        let s = RedbStore::open(&path).expect("reopen");
        assert_eq!(
            s.get("x").expect("get").map(|r| r.id),
            Some("x".to_string()),
            "records survive a reopen"
        );
        assert_eq!(s.list_history().expect("history").len(), HISTORY_MAX);
        assert!(s.get_step("shape").expect("step").is_some());
    }
}
