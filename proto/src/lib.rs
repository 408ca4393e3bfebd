//! thaw's wire protocol: the versioned protobuf services under `proto/thaw/v1/`.
//!
//! - `Jobs`: submit, get, list, cancel, watch (a stream of status and metrics events);
//! - `Workers`: join the rendezvous, heartbeat, get the epoch plan, report progress, leave.
//!
//! Generated code only; conversions to domain types live with the services, never here.

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("thaw.v1");
}

/// Largest message either side accepts or sends (job specs and plans are small; this bounds abuse).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
