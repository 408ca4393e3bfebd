//! The state store's contract, run against every implementation: memory, the embedded file
//! store, and etcd (a real etcd 3.4 member started here). Then etcd's fencing, for real: a
//! coordinator whose leadership etcd has moved past cannot write, and steps down.

mod common;
use std::time::{Duration, Instant};

use common::*;
use thaw_coordinator::etcd::{self, EtcdOptions, EtcdStore, Fence, Leadership};
use thaw_coordinator::job::JobRecord;
use thaw_coordinator::store::{FileStore, MemoryStore, StateStore, StoreError, StoredJob};

fn job(id: &str, samples: u64) -> StoredJob {
    let mut record = JobRecord::new(id, 1_000).unwrap();
    record.start_rendezvous("waiting", 1_001).unwrap();
    record.start_running("formed", 1_002).unwrap();
    record.record_progress(0, 3, samples, 1_003).unwrap();
    StoredJob {
        record,
        spec_toml: format!("name = \"{id}\"\n"),
        metrics: Vec::new(),
        num_samples: Some(64),
        workers: 2,
        generation: 1,
        restarts: 0,
        live: None,
        worker_token: None,
        ring_secret: "0a1b2c3d".into(),
    }
}

fn ids(store: &dyn StateStore) -> Vec<(String, u64)> {
    store
        .load_all()
        .unwrap()
        .iter()
        .map(|j| (j.record.job_id().to_string(), j.record.progress().samples_done))
        .collect()
}

/// What every store promises: put creates or replaces one job, load_all reads every job in id
/// order, delete forgets one (an unknown one included), bad ids are refused by name.
fn contract(store: &dyn StateStore) {
    assert!(store.load_all().unwrap().is_empty(), "starts empty");
    store.put_job(&job("b", 1)).unwrap();
    store.put_job(&job("a", 2)).unwrap();
    assert_eq!(ids(store), [("a".into(), 2), ("b".into(), 1)]);
    store.put_job(&job("b", 9)).unwrap();
    assert_eq!(ids(store), [("a".into(), 2), ("b".into(), 9)], "a put replaces");
    let back = store.load_all().unwrap();
    assert_eq!(back[1], job("b", 9), "a job reads back as it was put");
    store.delete_job("a").unwrap();
    store.delete_job("never-there").unwrap();
    assert_eq!(ids(store), [("b".into(), 9)]);
    for bad in ["", "../x", "a/b", &"x".repeat(201)] {
        match store.delete_job(bad) {
            Err(StoreError::InvalidId { id, .. }) => assert_eq!(id, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn every_store_keeps_the_same_contract() {
    contract(&MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    contract(&FileStore::open(&dir.path().join("state")).unwrap());

    let etcd = Etcd::start(&dir.path().join("etcd"), 1);
    let opts = EtcdOptions::parse(&etcd.url(), "/contract", 5).unwrap();
    let lead = Leadership::new("http://me");
    let store = EtcdStore::open(opts.clone(), lead.clone()).unwrap();
    // A standby writes nothing.
    assert!(matches!(store.put_job(&job("a", 1)), Err(StoreError::Fenced { .. })));
    let (key, rev) = win(&opts, "me");
    lead.elected(Fence { key, rev }, Instant::now() + Duration::from_secs(60));
    contract(&store);
    // A value over etcd's request limit is refused with its size, before it is sent.
    let mut big = job("big", 1);
    big.spec_toml = "#".repeat(etcd::MAX_VALUE_BYTES);
    match store.put_job(&big) {
        Err(StoreError::TooLarge { id, bytes, max }) => assert!(id == "big" && bytes > max, "{bytes} {max}"),
        other => panic!("{other:?}"),
    }
}

/// Wins the election of `opts` as `name` on a fresh lease: the leader key and its revision.
fn win(opts: &EtcdOptions, name: &str) -> (Vec<u8>, i64) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd::connect(opts, Some(Duration::from_secs(5))).await.unwrap();
        let lease = c.lease_grant(30, None).await.unwrap().id();
        let r = c.campaign(format!("{}/leader", opts.prefix), name, lease).await.unwrap();
        let k = r.leader().unwrap();
        (k.key().to_vec(), k.rev())
    })
}

/// Ends the leadership of `key` as a lapsed lease would: its key is gone.
fn lose(opts: &EtcdOptions, key: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd::connect(opts, Some(Duration::from_secs(5))).await.unwrap();
        c.delete(key.to_vec(), None).await.unwrap();
    })
}

#[test]
fn a_deposed_leader_cannot_write_once_another_took_over() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path(), 1);
    let opts = EtcdOptions::parse(&etcd.url(), "/fence", 5).unwrap();
    // A leads and writes.
    let (a_key, a_rev) = win(&opts, "a");
    let a = Leadership::new("a");
    a.elected(Fence { key: a_key.clone(), rev: a_rev }, Instant::now() + Duration::from_secs(60));
    let a_store = EtcdStore::open(opts.clone(), a.clone()).unwrap();
    a_store.put_job(&job("j", 1)).unwrap();
    // A is paused; its lease lapses (its key is gone); B wins and writes.
    lose(&opts, &a_key);
    let (b_key, b_rev) = win(&opts, "b");
    assert_ne!((a_key.clone(), a_rev), (b_key.clone(), b_rev));
    let b = Leadership::new("b");
    b.elected(Fence { key: b_key, rev: b_rev }, Instant::now() + Duration::from_secs(60));
    let b_store = EtcdStore::open(opts.clone(), b).unwrap();
    b_store.put_job(&job("j", 2)).unwrap();
    // A wakes, still believing its lease good by its clock (the worst case): every write of its
    // is refused by etcd, and it stands down.
    assert!(a.refusal().is_none(), "A still thinks it leads");
    match a_store.put_job(&job("j", 666)) {
        Err(StoreError::Fenced { reason }) => assert!(reason.contains("another coordinator"), "{reason}"),
        other => panic!("a deposed leader wrote: {other:?}"),
    }
    assert!(a.refusal().is_some(), "A stepped down after its write was fenced off");
    assert!(matches!(a_store.delete_job("j"), Err(StoreError::Fenced { .. })));
    assert_eq!(ids(&b_store), [("j".into(), 2)], "B's value stands");

    // etcd gone: the store says so (retryable), it does not hang.
    drop(etcd);
    let t = Instant::now();
    let err = b_store.put_job(&job("j", 3)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }) && err.is_retryable(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_bad_store_is_refused_by_name() {
    for (store, expect) in [
        ("bogus://x", "--store bogus://x: expected file://DIR, memory or etcd://"),
        ("etcd://", "`etcd://`: no etcd endpoint"),
        ("etcd://hostonly", "endpoint `hostonly` has no port"),
    ] {
        let err = fails(thaw(&["coordinator", "--listen", "127.0.0.1:0", "--store", store]));
        assert!(err.contains(expect), "{store}: {err}");
    }
    let err = fails(thaw(&["coordinator", "--listen", "127.0.0.1:0", "--store", "etcd://h:1", "--prefix", "thaw"]));
    assert!(err.contains("--prefix `thaw`: must start with `/`"), "{err}");
}
