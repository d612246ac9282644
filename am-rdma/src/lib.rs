//! `am-rdma`: the Active Messages transport over RDMA verbs (placeholder).
//!
//! It will hold the verbs driver of DESIGN.md §2: RC queue pairs, memory registration,
//! SEND/RECV for small and medium messages, RDMA WRITE with immediate for bulk, and the
//! completion channel as the wake-up fd. It will implement `am_core::Transport` with the
//! capabilities `reliable` and `bulk_placement`, so the engine adds no retransmission.
//! See the am-rdma issue; nothing here is usable yet.
