//! Walking the audit trail page by page with reading and checking overlapped: the seal function
//! and `audit verify` both read a page of events from the store while the page before it is
//! hashed on a blocking thread, so the walk takes about the longer of the two instead of their
//! sum.

use std::future::Future;

/// The runtime shut down while a page was being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// Reads pages with `read(from)`, starting at `from`, and hands each to `check` in order,
/// until a page is empty (`next_from` gives `None`) or `check` stops with a finding. Under a
/// Tokio runtime a page is checked on a blocking thread while the next one is read; elsewhere
/// inline. Returns the state and the finding that stopped the walk, if any; a read error ends
/// it with that error (after the page in flight is checked).
pub async fn walk<S, P, B, E, R, Fut>(
    state: S,
    mut from: u64,
    mut read: R,
    next_from: fn(&P) -> Option<u64>,
    check: fn(&mut S, &P) -> Option<B>,
) -> Result<(S, Option<B>), E>
where
    S: Send + 'static,
    P: Send + 'static,
    B: Send + 'static,
    E: From<Interrupted>,
    R: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<P, E>>,
{
    let runtime = tokio::runtime::Handle::try_current().ok();
    let mut slot = Slot::Here(state);
    loop {
        let page = read(from).await;
        let mut state = match slot {
            Slot::Here(state) => state,
            Slot::Away(task) => {
                let (state, found) = task.await.map_err(|e| {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                    Interrupted
                })?;
                if found.is_some() {
                    return Ok((state, found));
                }
                state
            }
        };
        let page = page?;
        let Some(next) = next_from(&page) else {
            return Ok((state, None));
        };
        from = next;
        slot = match &runtime {
            Some(rt) => Slot::Away(rt.spawn_blocking(move || {
                let found = check(&mut state, &page);
                (state, found)
            })),
            None => match check(&mut state, &page) {
                Some(found) => return Ok((state, Some(found))),
                None => Slot::Here(state),
            },
        };
    }
}

/// Where the state is: here, or checking a page on a blocking thread.
enum Slot<S, B> {
    Here(S),
    Away(tokio::task::JoinHandle<(S, Option<B>)>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Read,
        Interrupted,
    }
    impl From<Interrupted> for E {
        fn from(_: Interrupted) -> Self {
            E::Interrupted
        }
    }

    /// Pages of 3 numbers up to 10; the state sums them, in order.
    async fn page(from: u64, fail_at: Option<u64>) -> Result<Vec<u64>, E> {
        if Some(from) == fail_at {
            return Err(E::Read);
        }
        Ok((from..(from + 3).min(11)).collect())
    }

    #[allow(clippy::ptr_arg)] // the page type is `Vec`: a fn over `&P`
    fn next(p: &Vec<u64>) -> Option<u64> {
        p.last().map(|l| l + 1)
    }

    #[allow(clippy::ptr_arg)] // the page type is `Vec`: a fn over `&P`
    fn sum(s: &mut (u64, Vec<u64>), p: &Vec<u64>) -> Option<u64> {
        for &n in p {
            if n == 7 && s.1.is_empty() {
                return Some(n);
            }
            s.0 += n;
        }
        s.1.push(p[0]);
        None
    }

    #[allow(clippy::ptr_arg)] // the page type is `Vec`: a fn over `&P`
    fn sum_all(s: &mut (u64, Vec<u64>), p: &Vec<u64>) -> Option<u64> {
        s.0 += p.iter().sum::<u64>();
        s.1.push(p[0]);
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_checked_in_order_overlapped_or_inline() {
        let (s, found) = walk((0, Vec::new()), 1, |f| page(f, None), next, sum_all)
            .await
            .expect("walk");
        assert_eq!((s.0, s.1, found), (55, vec![1, 4, 7, 10], None));
        // Without a runtime, inline.
        let inline = std::thread::spawn(|| {
            futures_lite_block_on(walk((0, Vec::new()), 1, |f| page(f, None), next, sum_all))
        })
        .join()
        .expect("thread")
        .expect("walk");
        assert_eq!(inline.0 .0, 55);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finding_stops_the_walk_and_a_read_error_is_returned() {
        // `sum` stops at 7 only while no page was pushed: the first page is pushed, so it runs on.
        let (s, found) = walk((0, Vec::new()), 1, |f| page(f, None), next, sum)
            .await
            .expect("walk");
        assert_eq!((s.0, found), (55, None));
        let (s, found) = walk((0, Vec::new()), 7, |f| page(f, None), next, sum)
            .await
            .expect("walk");
        assert_eq!((s.0, found), (0, Some(7)));
        let err = walk((0, Vec::new()), 1, |f| page(f, Some(7)), next, sum_all)
            .await
            .expect_err("read error");
        assert_eq!(err, E::Read);
    }

    /// A minimal executor for the no-runtime path (the futures here never wait).
    fn futures_lite_block_on<F: Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
