//! thaw's wire protocol: the versioned protobuf services under `proto/thaw/v1/`.
//!
//! Empty until the distributed-training work (coordinator and worker services) lands; the crate
//! exists so that the workspace layout matches `ARCHITECTURE.md` from the start.
