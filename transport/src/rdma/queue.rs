//! One RC queue pair with its completion queue: creation, connection, polling and waiting.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;

use super::error::io_of;
use super::{RdmaDevice, RdmaError};
use crate::LaneError;

/// Most scatter-gather entries rmig puts in one WRITE (the device may allow fewer).
pub(crate) const MAX_SGE: u32 = 16;

/// What the peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// GID of the port (RoCE: the IP address).
    pub gid: [u8; 16],
}

/// A completed work request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub byte_len: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == rdma_mummy_sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// The failure as a lane error, named as verbs names it.
    pub fn error(&self, what: &str) -> LaneError {
        let name = self.status_name();
        LaneError::Rdma(format!("{what} failed: {name} (status {})", self.status))
    }

    /// The status as verbs names it (`ibv_wc_status_str`).
    pub fn status_name(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a pointer to a static string for any value (or
        // null when libibverbs is missing, handled below).
        unsafe {
            let p = rdma_mummy_sys::ibv_wc_status_str(self.status);
            if p.is_null() {
                format!("status {}", self.status)
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }
}

/// An RC queue pair and the completion queue of both its queues.
pub(crate) struct Queue {
    pub dev: Arc<RdmaDevice>,
    pub qp: BasicQueuePair,
    pub cq: Arc<BasicCompletionQueue>,
    chan: Option<Arc<CompletionChannel>>,
    psn: u32,
    /// RDMA READs this queue pair may have outstanding as the reader (0: it reads nothing).
    read_depth: u8,
    /// RDMA READs it may answer at once as the responder (0: it allows none).
    read_resources: u8,
    /// Transport retries before a work request fails with "retry exceeded".
    retry_cnt: u8,
}

impl Queue {
    /// Creates a queue pair with room for `send` and `recv` outstanding work requests;
    /// `events`: completions can be waited for (else only polled).
    pub fn new(
        dev: Arc<RdmaDevice>,
        send: u32,
        recv: u32,
        events: bool,
    ) -> Result<Queue, RdmaError> {
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite;
        Queue::with_access(dev, send, recv, events, access)
    }

    /// As [`new`](Self::new), with `access` for what the peer may do to memory through it
    /// (post-copy's exposure allows remote reads only).
    pub fn with_access(
        dev: Arc<RdmaDevice>,
        send: u32,
        recv: u32,
        events: bool,
        access: AccessFlags,
    ) -> Result<Queue, RdmaError> {
        let chan = if events {
            Some(
                dev.ctx
                    .create_comp_channel()
                    .map_err(|e| RdmaError::verbs("ibv_create_comp_channel", io_of(&e)))?,
            )
        } else {
            None
        };
        let mut b = dev.ctx.create_cq_builder();
        b.setup_cqe(send + recv + 1);
        if let Some(c) = &chan {
            b.setup_comp_channel(c, 0);
        }
        let cq = b
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_cq", io_of(&e)))?;
        let mut qb = dev.pd.create_qp_builder();
        qb.setup_max_send_wr(send)
            .setup_max_recv_wr(recv.max(1))
            .setup_max_send_sge(dev.max_sge.min(MAX_SGE))
            .setup_max_recv_sge(1)
            .setup_max_inline_data(0)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone());
        let mut qp = qb
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_qp", io_of(&e)))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(dev.port)
            .setup_access_flags(access);
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs("queue pair to INIT", io_of(&e)))?;
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|e| RdmaError::Setup(format!("no randomness: {e}")))?;
        Ok(Queue {
            dev,
            qp,
            cq,
            chan,
            psn: u32::from_le_bytes(r) & 0x00ff_ffff,
            read_depth: 0,
            read_resources: 0,
            retry_cnt: 7,
        })
    }

    /// Sets, before [`connect`](Self::connect), how many RDMA READs this queue pair may have
    /// outstanding as the reader (`depth`) and answer at once as the responder (`resources`).
    pub fn set_reads(&mut self, depth: u8, resources: u8) {
        self.read_depth = depth;
        self.read_resources = resources;
    }

    /// Sets, before [`connect`](Self::connect), how often the queue pair retransmits before
    /// it fails its work request (at most 7). Soft-RoCE takes 7 for "retry for ever", as the
    /// spec does for RNR retries only: a peer that is gone then never fails a request.
    pub fn set_retries(&mut self, n: u8) {
        self.retry_cnt = n.min(7);
    }

    /// Our end, for the peer.
    pub fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: self.dev.gid.raw,
        }
    }

    /// Connects to the peer's end: INIT → RTR → RTS.
    pub fn connect(&mut self, peer: &QpEndpoint) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.dev.mtu)
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn & 0x00ff_ffff)
            .setup_max_dest_read_atomic(self.read_resources)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0)
            .setup_port(self.dev.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.dev.gid_index)
            .setup_grh_dest_gid(&Gid { raw: peer.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| RdmaError::verbs("queue pair to RTR", io_of(&e)))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(14)
            .setup_retry_cnt(self.retry_cnt)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(self.read_depth);
        self.qp
            .modify(&attr)
            .map_err(|e| RdmaError::verbs("queue pair to RTS", io_of(&e)))?;
        Ok(())
    }

    /// Moves the queue pair to the error state: everything outstanding is flushed (tests).
    #[cfg(feature = "fault-injection")]
    pub fn set_error(&mut self) {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        let _ = self.qp.modify(&attr);
    }

    /// Appends what completed (without waiting) to `out`.
    pub fn poll(&self, out: &mut Vec<Completion>) {
        if let Ok(p) = self.cq.start_poll() {
            for wc in p {
                out.push(Completion {
                    wr_id: wc.wr_id(),
                    status: wc.status(),
                    byte_len: wc.byte_len(),
                });
            }
        }
    }

    /// Waits until a completion may be there, `other_fd` becomes readable or `timeout`
    /// passes; returns whether `other_fd` (ignored when negative) is readable. Completions found while arming the
    /// queue are appended to `out`. Needs `events` at creation.
    pub fn wait(
        &self,
        other_fd: i32,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<bool, LaneError> {
        let chan = self.chan.as_ref().expect("queue created with events");
        // SAFETY: the CQ lives as long as `self`; arming it has no other effect.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(LaneError::Rdma(format!("ibv_req_notify_cq: error {rc}")));
        }
        // A completion that came before arming raises no event: look once more.
        let mut fds = [
            libc::pollfd {
                fd: chan.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let before = out.len();
        self.poll(out);
        if out.len() > before {
            return Ok(false);
        }
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e.into());
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: the channel is valid and readable (poll said so), so this returns at
            // once with the CQ that raised the event, which is acknowledged right after.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(chan.comp_channel().as_ptr(), &mut cq, &mut ctx)
            };
            if rc == 0 {
                // SAFETY: `cq` is the CQ the event came from (ours), still alive.
                unsafe { rdma_mummy_sys::ibv_ack_cq_events(cq, 1) };
            }
        }
        Ok(other_fd >= 0 && fds[1].revents != 0)
    }
}
