//! The broker-wide budget of bytes held for fetch responses (`limits.fetch_response_budget_bytes`).
//!
//! ```text
//!  fetch ─ acquire(reserve) ─▶ read from disk ─▶ shrink to what was read ─▶ frame ─▶ writer
//!            │ waits (FIFO) while                   (the rest goes back        │
//!            │ others hold the budget                at once)                  ▼
//!            └────────────────────────── released when the frame is written ◀──┘
//! ```
//!
//! A fetch reserves, before it reads, as many bytes as its response can hold: the request's
//! `max_bytes` (bounded by its partitions' limits), or the largest batch its partitions accept
//! when that is more, since the first batch is always returned whole. It reads at most what it
//! reserved, gives back the unused part, and keeps the rest until the connection has written
//! the response. A long poll holds nothing while it waits for data.
//!
//! A reservation is never larger than the whole budget, and a fetch never waits for budget
//! while holding some, so one fetch always proceeds once nothing else holds budget: no
//! deadlock. The semaphore is fair, so a large fetch is not starved by a stream of small ones.
//! A fetch that cannot get budget before its deadline is answered without records, its
//! partitions marked `Throttled`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The budget: a semaphore with one permit per byte.
#[derive(Debug)]
pub struct FetchBudget {
    permits: Arc<Semaphore>,
    total_bytes: usize,
    /// The largest single reservation: the whole budget, up to `u32::MAX`.
    max_reservation_bytes: u32,
}

/// Bytes held from a [`FetchBudget`]; they go back when this is dropped.
#[derive(Debug)]
pub struct FetchBudgetPermit {
    permit: OwnedSemaphorePermit,
}

impl FetchBudget {
    /// A budget of `total_bytes`. A single reservation is at most `u32::MAX` bytes (a fetch's
    /// `max_bytes` is a `u32`), so a larger budget is used up to that per fetch and in full
    /// across fetches.
    pub fn new(total_bytes: u64) -> Self {
        let total = usize::try_from(total_bytes)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        FetchBudget {
            permits: Arc::new(Semaphore::new(total)),
            total_bytes: total,
            max_reservation_bytes: u32::try_from(total).unwrap_or(u32::MAX),
        }
    }

    /// The whole budget.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Bytes no fetch holds right now.
    pub fn available_bytes(&self) -> usize {
        self.permits.available_permits()
    }

    /// Reserves `bytes` (at most the largest single reservation), waiting in line until they
    /// are free or `deadline` passes. `None` when the deadline passed first.
    pub async fn acquire(&self, bytes: u64, deadline: Instant) -> Option<FetchBudgetPermit> {
        let bytes = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_reservation_bytes);
        let acquire = Arc::clone(&self.permits).acquire_many_owned(bytes);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(permit)) => Some(FetchBudgetPermit { permit }),
            // The semaphore is never closed; a timeout is the only other way out.
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

impl FetchBudget {
    /// Reserves `bytes` (at most the largest single reservation) if they are free now.
    pub fn try_acquire(&self, bytes: u64) -> Option<FetchBudgetPermit> {
        let bytes = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_reservation_bytes);
        let permit = Arc::clone(&self.permits)
            .try_acquire_many_owned(bytes)
            .ok()?;
        Some(FetchBudgetPermit { permit })
    }
}

impl FetchBudgetPermit {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit.num_permits()
    }

    /// Gives back everything above `bytes` (at least one byte stays held until the drop).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = bytes.max(1);
        let held = self.permit.num_permits();
        if held > keep {
            drop(self.permit.split(held - keep));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_reservation_larger_than_the_budget_is_clamped_and_proceeds() {
        let budget = FetchBudget::new(1000);
        let permit = budget.acquire(1 << 20, soon()).await.expect("whole budget");
        assert_eq!(permit.bytes(), 1000);
        assert_eq!(budget.available_bytes(), 0);
        drop(permit);
        assert_eq!(budget.available_bytes(), 1000);
    }

    #[tokio::test]
    async fn shrinking_returns_the_rest_at_once() {
        let budget = FetchBudget::new(1000);
        let mut permit = budget.acquire(600, soon()).await.unwrap();
        permit.shrink_to(100);
        assert_eq!(permit.bytes(), 100);
        assert_eq!(budget.available_bytes(), 900);
        permit.shrink_to(0);
        assert_eq!(permit.bytes(), 1);
        drop(permit);
        assert_eq!(budget.available_bytes(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_waits_for_budget_and_gives_up_at_its_deadline() {
        let budget = Arc::new(FetchBudget::new(1000));
        let held = budget.acquire(800, soon()).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(budget.acquire(500, deadline).await.is_none());
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.acquire(500, soon()).await.map(|p| p.bytes()) })
        };
        tokio::task::yield_now().await;
        // It waits: 200 bytes are free, not 500 (and they are kept for it, first in line).
        assert!(!waiter.is_finished());
        assert_eq!(budget.available_bytes(), 0);
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(500));
    }
}
