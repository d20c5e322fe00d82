//! A [`hyper::rt::Timer`] whose sleeps share one tokio timer, for hyper's HTTP/1 header-read
//! timeout (slowloris protection).
//!
//! hyper arms that timeout at the start of every request head on a keep-alive connection and
//! drops it when the head is complete. With tokio's timer each arming is an entry inserted into
//! the timer wheel and removed again, about 1.2k instructions per proxied request. Here a sleep
//! is a slot in one table under one lock, and a single driver task sleeps until the earliest
//! deadline, wakes the sleeps that are due, and goes back to sleep. Arming and disarming cost a
//! lock and a slot each; deadlines stay exact (no coarse ticks, no wake-ups while nothing is due).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The timer handed to hyper. Clones share one table and one driver task; the driver ends once
/// the last clone is dropped.
#[derive(Clone)]
pub struct SharedTimer {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for SharedTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTimer").finish_non_exhaustive()
    }
}

struct Shared {
    table: Mutex<Table>,
    /// Wakes the driver: a sleep earlier than the driver's next look, or the last timer gone.
    notify: Notify,
}

/// Closes the table when the last [`SharedTimer`] clone goes.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        let wakers = {
            let mut t = self.0.table.lock();
            t.closed = true;
            t.fire_all()
        };
        wakers.into_iter().for_each(Waker::wake);
        self.0.notify.notify_one();
    }
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// When the driver looks next; `None` while it waits for a notification.
    next_look: Option<Instant>,
    driver_started: bool,
    closed: bool,
}

enum Slot {
    Vacant,
    Armed { deadline: Instant, waker: Waker },
    Fired,
}

impl Table {
    fn insert(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(key) => {
                self.slots[key] = slot;
                key
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, key: usize) {
        if let Some(s) = self.slots.get_mut(key) {
            *s = Slot::Vacant;
            self.free.push(key);
        }
    }

    /// Marks every sleep due at `now` fired and returns their wakers (woken after the lock is
    /// released) and the earliest deadline still pending.
    fn fire_due(&mut self, now: Instant) -> (Vec<Waker>, Option<Instant>) {
        let mut wakers = Vec::new();
        let mut next: Option<Instant> = None;
        for slot in &mut self.slots {
            match slot {
                Slot::Armed { deadline, .. } if *deadline <= now => wakers.extend(fire(slot)),
                Slot::Armed { deadline, .. } => {
                    next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                }
                Slot::Vacant | Slot::Fired => {}
            }
        }
        (wakers, next)
    }

    fn fire_all(&mut self) -> Vec<Waker> {
        self.slots.iter_mut().filter_map(fire).collect()
    }
}

/// Marks an armed slot fired and returns its waker; other slots stay as they are.
fn fire(slot: &mut Slot) -> Option<Waker> {
    match std::mem::replace(slot, Slot::Fired) {
        Slot::Armed { waker, .. } => Some(waker),
        other => {
            *slot = other;
            None
        }
    }
}

impl SharedTimer {
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            notify: Notify::new(),
        });
        SharedTimer {
            _owner: Arc::new(Owner(Arc::clone(&shared))),
            shared,
        }
    }

    /// A sleep until `deadline` (a plain future; hyper gets it boxed).
    pub fn sleep_at(&self, deadline: Instant) -> SharedSleep {
        SharedSleep {
            shared: Arc::clone(&self.shared),
            deadline,
            key: None,
            done: false,
        }
    }

    /// `fut`, or [`Elapsed`] once `deadline` passes: tokio's `timeout_at` on this timer.
    pub fn within<F: Future + Unpin>(&self, deadline: Instant, fut: F) -> Within<F> {
        Within {
            fut,
            sleep: self.sleep_at(deadline),
        }
    }
}

impl Default for SharedTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// The clock deadlines are measured on: tokio's (which follows a paused test clock), as a std
/// `Instant` like hyper's.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl hyper::rt::Timer for SharedTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(now() + duration)
    }

    fn now(&self) -> Instant {
        now()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep_at(deadline))
    }
}

/// The deadline passed before the future finished (see [`SharedTimer::within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// The future of [`SharedTimer::within`].
pub struct Within<F> {
    fut: F,
    sleep: SharedSleep,
}

impl<F: Future + Unpin> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(v) = Pin::new(&mut this.fut).poll(cx) {
            return Poll::Ready(Ok(v));
        }
        Pin::new(&mut this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}

/// One sleep: a slot in the shared table from its first poll until it fires or is dropped.
pub struct SharedSleep {
    shared: Arc<Shared>,
    deadline: Instant,
    key: Option<usize>,
    done: bool,
}

impl hyper::rt::Sleep for SharedSleep {}

impl Future for SharedSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(());
        }
        let mut table = this.shared.table.lock();
        if let Some(key) = this.key {
            return match table.slots.get_mut(key) {
                Some(Slot::Armed { waker, .. }) => {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    Poll::Pending
                }
                _ => {
                    table.release(key);
                    this.key = None;
                    this.done = true;
                    Poll::Ready(())
                }
            };
        }
        if table.closed {
            this.done = true;
            return Poll::Ready(());
        }
        let key = table.insert(Slot::Armed {
            deadline: this.deadline,
            waker: cx.waker().clone(),
        });
        this.key = Some(key);
        let earlier = table.next_look.is_none_or(|t| this.deadline < t);
        if earlier {
            table.next_look = Some(this.deadline);
        }
        // The driver starts on the runtime of the first sleep polled inside one.
        let runtime = if table.driver_started {
            None
        } else {
            tokio::runtime::Handle::try_current().ok()
        };
        table.driver_started |= runtime.is_some();
        drop(table);
        match runtime {
            Some(rt) => drop(rt.spawn(drive(Arc::downgrade(&this.shared)))),
            None if earlier => this.shared.notify.notify_one(),
            None => {}
        }
        Poll::Pending
    }
}

impl Drop for SharedSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.shared.table.lock().release(key);
        }
    }
}

/// The driver: wakes the sleeps that are due, then waits until the next deadline or until a
/// sleep with an earlier one (or the end) is announced.
async fn drive(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let (wakers, next) = {
            let mut t = s.table.lock();
            if t.closed {
                return;
            }
            let (wakers, next) = t.fire_due(now());
            t.next_look = next;
            (wakers, next)
        };
        wakers.into_iter().for_each(Waker::wake);
        let notified = s.notify.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn a_sleep_fires_at_its_deadline_not_before() {
        let timer = SharedTimer::new();
        let start = Instant::now();
        timer.sleep_at(start + ms(80)).await;
        let took = start.elapsed();
        assert!(took >= ms(80), "fired after {took:?}");
        assert!(took < ms(2000), "fired after {took:?}");
    }

    #[tokio::test]
    async fn an_earlier_sleep_armed_later_is_not_held_up_by_a_later_one() {
        let timer = SharedTimer::new();
        let start = Instant::now();
        let mut late = Box::pin(timer.sleep_at(start + Duration::from_secs(30)));
        // Arm the late one first: the driver now sleeps until it.
        assert!(futures_util::poll!(late.as_mut()).is_pending());
        timer.sleep_at(start + ms(50)).await;
        assert!(start.elapsed() < ms(2000), "{:?}", start.elapsed());
        assert!(futures_util::poll!(late.as_mut()).is_pending());
    }

    #[tokio::test]
    async fn dropped_sleeps_free_their_slots_and_others_still_fire() {
        let timer = SharedTimer::new();
        let start = Instant::now();
        for _ in 0..100 {
            let mut s = Box::pin(timer.sleep_at(start + Duration::from_secs(60)));
            assert!(futures_util::poll!(s.as_mut()).is_pending());
        }
        // One hundred arm-and-drop cycles reuse one slot.
        assert_eq!(timer.shared.table.lock().slots.len(), 1);
        let both = futures_util::future::join(
            timer.sleep_at(start + ms(30)),
            timer.sleep_at(start + ms(60)),
        );
        tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("both sleeps fire");
    }

    #[tokio::test]
    async fn within_gives_the_result_or_elapsed() {
        let timer = SharedTimer::new();
        let start = Instant::now();
        let quick = timer.within(start + Duration::from_secs(30), std::future::ready(7));
        assert_eq!(quick.await, Ok(7));
        let never = timer.within(start + ms(40), std::future::pending::<()>());
        assert_eq!(never.await, Err(Elapsed));
        assert!(start.elapsed() >= ms(40));
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_a_paused_tokio_clock() {
        let timer = SharedTimer::new();
        let at = hyper::rt::Timer::now(&timer) + Duration::from_secs(3600);
        // Paused: tokio jumps its clock to the driver's next deadline when everything idles.
        tokio::time::timeout(Duration::from_secs(7200), timer.sleep_at(at))
            .await
            .expect("fired on the paused clock");
    }

    #[tokio::test]
    async fn the_driver_ends_with_the_last_timer_and_pending_sleeps_complete() {
        let timer = SharedTimer::new();
        let weak = Arc::downgrade(&timer.shared);
        let mut s = Box::pin(timer.sleep_at(Instant::now() + Duration::from_secs(60)));
        assert!(futures_util::poll!(s.as_mut()).is_pending());
        drop(timer);
        // The closed table completes the sleep (a server gone: its header timeouts end).
        tokio::time::timeout(Duration::from_secs(5), s.as_mut())
            .await
            .expect("completed when the timer went");
        drop(s);
        for _ in 0..100 {
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(ms(10)).await;
        }
        panic!("the driver still holds the table");
    }
}
