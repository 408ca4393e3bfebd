//! Writes the seeds under `fuzz/seeds/` that thaw itself makes from real files: packed shards of
//! real photos and of Fashion-MNIST, Fashion-MNIST's IDX heads (raw and gzip'd), the examples'
//! job specs, a thaw checkpoint and weights as safetensors, and call sequences for the
//! coordinator core. Run from the repository root:
//!
//!     cargo run -p thaw-fuzz-targets --example make-seeds
//!
//! (The torch checkpoints, pickles and JPEG/PNG crops come from `fuzz/make_seeds.py`.)

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tch::Tensor;
use thaw_fuzz_targets::grpc_core::{message, record, Op};
use thaw_fuzz_targets::join;
use thaw_proto::v1 as pb;
use thaw_worker::data::shards::{self, PackOptions};

const MAX: usize = 64 * 1024;

fn seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

fn put(target: &str, name: &str, data: &[u8]) {
    assert!(data.len() < MAX, "{target}/{name} is {} bytes", data.len());
    let dir = seeds().join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first `n` items of an IDX file (`item` bytes each after `header` bytes), its count set to `n`.
fn idx_head(raw: &[u8], header: usize, item: usize, n: u32) -> Vec<u8> {
    let mut out = raw[..header + item * n as usize].to_vec();
    out[4..8].copy_from_slice(&n.to_be_bytes());
    out
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
    out
}

/// A packed directory's three files joined: index.json, samples.bin, the first shard.
fn packed(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    (read("index.json"), read("samples.bin"), read("shard-000000.tar"))
}

fn main() {
    let fmnist = repo().join(".thaw/data/fashion-mnist");
    let images = gunzip(&fmnist.join("train-images-idx3-ubyte.gz"));
    let labels = gunzip(&fmnist.join("train-labels-idx1-ubyte.gz"));

    // IDX: heads of the real files, raw and gzip'd, with their counts made consistent.
    for n in [1u32, 8, 40] {
        let (i, l) = (idx_head(&images, 16, 784, n), idx_head(&labels, 8, 1, n));
        put("idx", &format!("fashion-mnist.{n}.raw"), &join(&[&i, &l]));
        put("idx", &format!("fashion-mnist.{n}.gz"), &join(&[&gz(&i), &gz(&l)]));
    }
    let t10k = gunzip(&fmnist.join("t10k-images-idx3-ubyte.gz"));
    let t10k_labels = gunzip(&fmnist.join("t10k-labels-idx1-ubyte.gz"));
    put("idx", "fashion-mnist-t10k.16.raw", &join(&[&idx_head(&t10k, 16, 784, 16), &idx_head(&t10k_labels, 8, 1, 16)]));

    // Packed shards of Fashion-MNIST (PNG members) and of real photos (JPEG members).
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("fmnist");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("train-images-idx3-ubyte"), idx_head(&images, 16, 784, 24)).unwrap();
    std::fs::write(src.join("train-labels-idx1-ubyte"), idx_head(&labels, 8, 1, 24)).unwrap();
    let out = tmp.path().join("fmnist-packed");
    let opts = PackOptions {
        shard_bytes: 1 << 20,
        seed: 1,
        shuffle: true,
        threads: 1,
        split: Some(thaw_worker::data::idx::Split::Train),
    };
    shards::pack_dataset(&src, &out, &opts).unwrap();
    let (index, samples, tar) = packed(&out);
    put("shard_index", "fashion-mnist.24", &join(&[&index, &samples]));
    put("shard_tar", "fashion-mnist.24", &join(&[&index, &samples, &tar]));

    let photos = tmp.path().join("photos");
    for (class, files) in [
        ("space", &["hubble.baseline.jpg", "hubble.progressive.jpg"][..]),
        ("rocket", &["rocket.200x150.jpg", "hubble.gray.jpg"][..]),
    ] {
        std::fs::create_dir_all(photos.join(class)).unwrap();
        for f in files {
            std::fs::copy(seeds().join("image_decode").join(f), photos.join(class).join(f)).unwrap();
        }
    }
    let out = tmp.path().join("photos-packed");
    let opts = PackOptions { shard_bytes: 1 << 20, seed: 2, shuffle: false, threads: 1, split: None };
    shards::pack_dataset(&photos, &out, &opts).unwrap();
    let (index, samples, tar) = packed(&out);
    put("shard_index", "photos.4", &join(&[&index, &samples]));
    put("shard_tar", "photos.4", &join(&[&index, &samples, &tar]));
    // A bigger index without its shards (what `thaw data` tests use for scale).
    let synth = tmp.path().join("synth");
    std::fs::create_dir_all(&synth).unwrap();
    shards::write_synthetic_index(&synth, 500, 3, 7).unwrap();
    let read = |n: &str| std::fs::read(synth.join(n)).unwrap();
    put("shard_index", "synthetic.500", &join(&[&read("index.json"), &read("samples.bin")]));

    // Job specs: the examples, and the schedules the tests use.
    let mut specs = Vec::new();
    for e in std::fs::read_dir(repo().join("examples")).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read(&p).unwrap();
            put("job_spec", &p.file_name().unwrap().to_string_lossy(), &text);
            specs.push(String::from_utf8(text).unwrap());
        }
    }
    let base = std::fs::read_to_string(repo().join("examples/fashion-mnist-head.toml")).unwrap();
    let schedules = [
        ("progressive", "strategy = \"progressive\"\nevery = 2\nunfreeze_lr_factor = 0.5\nlayer_decay = 0.1\nbn = \"frozen_stats\""),
        ("stages", "strategy = \"stages\"\n[[schedule.stages]]\nepochs = 1\ntrain = [\"head\"]\n[[schedule.stages]]\nepochs = 2\ntrain = { top = 3 }\nbn = \"train_affine\"\n[[schedule.stages]]\nepochs = 3\ntrain = \"all\""),
        ("lr_mult", "strategy = \"finetune_all\"\nlr_mult = { layer4 = 0.1, head = 2.0 }"),
    ];
    for (name, sched) in schedules {
        let Some(at) = base.find("[schedule]") else { break };
        let rest = &base[at + "[schedule]".len()..];
        let after = rest.find("\n[").map_or("", |i| &rest[i..]);
        let text = format!("{}[schedule]\n{sched}\n{after}", &base[..at]);
        put("job_spec", &format!("schedule-{name}.toml"), text.as_bytes());
    }

    // Safetensors: weights as `thaw weights import` writes them, and a thaw checkpoint.
    let t = |v: &[f32], shape: &[i64]| Tensor::from_slice(v).view(shape);
    let weights = vec![
        ("features.0.0.weight".to_string(), t(&[0.5; 18], &[2, 1, 3, 3])),
        ("features.0.1.running_mean".to_string(), t(&[0.0, 1.0], &[2])),
        ("classifier.1.bias".to_string(), Tensor::from_slice(&[1i64, 2, 3])),
    ];
    let meta = HashMap::from([
        ("format".to_string(), thaw_worker::weights::FORMAT.to_string()),
        ("arch".to_string(), "mobilenet_v2".to_string()),
    ]);
    put("safetensors", "weights.safetensors", &thaw_worker::tensor_io::safetensors_bytes(&weights, meta).unwrap());
    let spec = thaw_coordinator::spec::JobSpec::from_toml(&base, Path::new("/data")).unwrap();
    let ckpt = thaw_worker::checkpoint::Checkpoint {
        spec_toml: spec.to_toml(),
        arch: spec.model.arch.clone(),
        num_classes: 3,
        class_names: vec!["a".into(), "b".into(), "c".into()],
        cursor: thaw_worker::checkpoint::Cursor {
            epoch: 1,
            step: 7,
            loss_sum: 1.5,
            correct: 3,
            seen: 9,
            skipped: 0,
            world: 2,
            cut: None,
        },
        history: vec![],
        model: HashMap::from([("fc.weight".to_string(), t(&[1.0; 6], &[3, 2]))]),
        optim: HashMap::from([("momentum.fc.weight".to_string(), t(&[0.0; 6], &[3, 2]))]),
    };
    put("safetensors", "checkpoint.safetensors", &ckpt.to_bytes().unwrap());

    // gRPC call sequences: a job's whole life on two workers, a failure and a regroup, a cancel.
    let spec_toml = |name: &str| {
        let named = base.replacen("name = \"fashion-mnist-head\"", &format!("name = \"{name}\""), 1);
        format!(
            "{named}\n[distributed]\nmin_workers = 1\nmax_workers = 2\njoin_timeout_secs = 30\nlast_call_secs = 1\n\
             heartbeat_timeout_secs = 10\nrejoin_timeout_secs = 20\nmax_restarts = 2\n"
        )
    };
    let groups: Vec<String> =
        ["stem", "layer1", "layer2", "layer3", "layer4", "head"].iter().map(|s| s.to_string()).collect();
    let join_req = |job: &str, w: &str, gen: u32, cursor: Option<pb::EpochCursor>, failed: bool| pb::JoinRequest {
        job_id: job.into(),
        worker_id: w.into(),
        collective_addr: format!("127.0.0.1:{}", 4000 + w.len()),
        nccl_unique_id: vec![],
        num_train_samples: 1000,
        layer_groups: groups.clone(),
        generation: gen,
        cursor,
        reason: if failed { "peer closed".into() } else { String::new() },
        failed,
        closed_ranks: if failed { vec![1] } else { vec![] },
    };
    let tick = |ms10: u16| record(Op::Tick, &ms10.to_le_bytes());
    let hb = |job: &str, w: &str, rank| {
        message(Op::Heartbeat, &pb::HeartbeatRequest { job_id: job.into(), worker_id: w.into(), rank, generation: 1, telemetry: None })
    };
    let plan = |job: &str, w: &str, rank, epoch| {
        message(
            Op::EpochPlan,
            &pb::EpochPlanRequest { job_id: job.into(), rank, epoch, worker_id: w.into(), generation: 1 },
        )
    };
    let progress = |job: &str, w: &str, rank, epoch, step, metrics: bool| {
        message(
            Op::Progress,
            &pb::ProgressReport {
                job_id: job.into(),
                rank,
                progress: Some(pb::Progress { epoch, step, samples_done: step * 64, ..Default::default() }),
                metrics: metrics.then(|| pb::EpochMetrics {
                    epoch: epoch + 1,
                    train_loss: 0.5,
                    train_acc: 0.8,
                    val_loss: 0.6,
                    val_acc: 0.75,
                    images: 1000,
                    ..Default::default()
                }),
                worker_id: w.into(),
                generation: 1,
            },
        )
    };
    let submit =
        |name: &str| message(Op::Submit, &pb::SubmitRequest { spec_toml: spec_toml(name), ..Default::default() });
    let mut life = Vec::new();
    life.extend(submit("j"));
    life.extend(message(Op::Join, &join_req("j", "w0", 0, None, false)));
    life.extend(message(Op::Join, &join_req("j", "w1", 0, None, false)));
    life.extend(message(Op::PollJoin, &join_req("j", "w0", 0, None, false)));
    life.extend(hb("j", "w0", 0));
    life.extend(plan("j", "w0", 0, 0));
    life.extend(plan("j", "w1", 1, 0));
    life.extend(progress("j", "w0", 0, 0, 5, false));
    life.extend(tick(100));
    life.extend(progress("j", "w0", 0, 0, 15, true));
    life.extend(message(Op::Get, &pb::GetJobRequest { job_id: "j".into() }));
    life.extend(message(Op::List, &pb::ListJobsRequest { page_size: 10, page_token: String::new() }));
    life.extend(message(
        Op::Leave,
        &pb::LeaveRequest { job_id: "j".into(), worker_id: "w1".into(), succeeded: true, ..Default::default() },
    ));
    life.extend(message(
        Op::Leave,
        &pb::LeaveRequest { job_id: "j".into(), worker_id: "w0".into(), succeeded: true, ..Default::default() },
    ));
    life.extend(record(Op::Expire, &0u16.to_le_bytes()));
    put("grpc_core", "life", &life);

    let cursor = pb::EpochCursor { epoch: 0, world: 2, step: 3, cut: None };
    let mut failure = Vec::new();
    failure.extend(submit("f"));
    failure.extend(message(Op::Join, &join_req("f", "w0", 0, None, false)));
    failure.extend(message(Op::Join, &join_req("f", "w1", 0, None, false)));
    failure.extend(message(Op::PollJoin, &join_req("f", "w1", 0, None, false)));
    failure.extend(plan("f", "w1", 1, 0));
    failure.extend(message(Op::Join, &join_req("f", "w0", 1, Some(cursor), true)));
    failure.extend(tick(3000));
    failure.extend(hb("f", "w0", 0));
    failure.extend(message(Op::Join, &join_req("f", "w2", 0, None, false)));
    failure.extend(message(Op::PollJoin, &join_req("f", "w0", 1, Some(cursor), true)));
    failure.extend(record(Op::Restore, &[]));
    failure.extend(message(
        Op::Leave,
        &pb::LeaveRequest { job_id: "f".into(), worker_id: "w0".into(), graceful: true, ..Default::default() },
    ));
    failure.extend(tick(60000));
    failure.extend(message(Op::Cancel, &pb::CancelRequest { job_id: "f".into(), reason: "enough".into() }));
    failure.extend(message(Op::Delete, &pb::DeleteRequest { job_id: "f".into() }));
    put("grpc_core", "failure-regroup-restore", &failure);

    let mut resumed = Vec::new();
    resumed.extend(message(
        Op::Submit,
        &pb::SubmitRequest {
            spec_toml: spec_toml("r"),
            resume_from: "/ckpt/last.safetensors".into(),
            resume_cursor_json: r#"{"epoch":1,"world":3,"step":2,"cut":null}"#.into(),
        },
    ));
    resumed.extend(message(Op::Join, &join_req("r", "a", 0, None, false)));
    resumed.extend(tick(2000));
    resumed.extend(message(Op::PollJoin, &join_req("r", "a", 0, None, false)));
    resumed.extend(plan("r", "a", 0, 1));
    resumed.extend(message(
        Op::WorkerPlan,
        &pb::EpochPlan {
            epoch: 1,
            seed: 1,
            num_samples: 1000,
            world_size: 1,
            batch_size: 32,
            steps: 32,
            stage: Some(pb::FreezeStage {
                index: 0,
                first_epoch: 0,
                end_epoch: 2,
                trainable: vec![false, true],
                group_lr: vec![0.0, 0.01],
                bn_policy: "frozen_stats".into(),
                warmup_steps: 10,
                lr_schedule: "cosine".into(),
            }),
            affinity_epoch: None,
            read_block: None,
            shuffle_window: None,
            cut: Some(pb::Cut { base_world: 2, base_steps: 10, offset: 3 }),
        },
    ));
    resumed.extend(message(
        Op::Leave,
        &pb::LeaveRequest { job_id: "r".into(), worker_id: "a".into(), error: "boom".into(), ..Default::default() },
    ));
    put("grpc_core", "resumed-then-failed", &resumed);
    for (i, s) in specs.iter().enumerate() {
        put(
            "grpc_core",
            &format!("submit-example-{i}"),
            &message(Op::Submit, &pb::SubmitRequest { spec_toml: s.clone(), ..Default::default() }),
        );
    }
    println!("seeds written under {}", seeds().display());
}
