//! Repeated token requests, answered without parsing or looking anything up again.
//!
//! Internal services send the same request (same key, same body) before every Trackunit call. The first
//! one takes the hot path of [`super::tokens`] (parse, grants, directory, token cache); what it found is
//! remembered on the worker thread under the exact bytes of the key's digest and the body. A repeat is
//! answered from that memory only while nothing the answer rests on can have changed:
//! - the directory's generation is the one read before the first answer's lookups. Every change of a
//!   client (a revoked key) or an installation (uninstalled, new credentials, rejected), made here or
//!   on another replica (by NOTIFY), moves it, and so does a reconnect of the NOTIFY listener;
//! - the memory is younger than the directory's own time to live (the bound should a NOTIFY be lost);
//! - the cached token has not been replaced by a newer one, and is fresh for the `min_ttl` asked.
//!
//! Parsing and the grant check depend on the bytes and the directory alone, so the same bytes under the
//! same generation get the same answer. Anything else falls through to the hot path, which decides as
//! before. While installs stream in, the generation moves on so often that little is served from here;
//! answers are then as fast as the hot path, no slower.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::AppState;
use crate::broker::{Broker, FastHash, Lease, Token};
use crate::directory;
use crate::store::api_client::ApiClient;

/// Most requests remembered per worker thread; beyond it the memory starts over (a bound, not a policy:
/// a service asks for a handful of distinct bodies, and each is learnt again on its next request).
const CAPACITY: usize = 4096;
/// Longest body remembered: token requests are a few dozen bytes; larger ones are rare and not worth it.
const LONGEST_BODY: usize = 1024;

thread_local! {
    static REMEMBERED: RefCell<Memory<Answer>> = RefCell::new(Memory::default());
}

/// What a token request found, and what it rests on besides the generation and the time.
struct Answer {
    broker: Weak<Broker>,
    client: Arc<ApiClient>,
    lease: Lease,
}

/// The token for a request seen before on this thread, if everything its answer rests on is unchanged
/// (`generation`: the directory's, read now). On `None` the caller takes the hot path.
pub fn replay(state: &AppState, generation: u64, digest: &[u8; 32], body: &[u8]) -> Option<Arc<Token>> {
    let broker = &state.broker;
    REMEMBERED.with_borrow_mut(|memory| {
        let token = memory.recall(digest, body, generation, Instant::now()).and_then(|answer| {
            let token = std::ptr::eq(answer.broker.as_ptr(), Arc::as_ptr(broker))
                .then(|| broker.serve_again(&answer.lease))
                .flatten()?;
            answer.client.usage.mark();
            super::tokens::record_on_span(&answer.client, answer.lease.installation());
            Some(token)
        });
        if token.is_none() {
            // Stale, or its token was replaced: the hot path decides, and learns again.
            memory.forget(digest, body);
        }
        token
    })
}

/// Remembers what a request found; `generation` is the directory's, read before the request looked
/// anything up. Not remembered if anything changed since.
pub fn learn(state: &AppState, generation: u64, digest: &[u8; 32], body: &[u8], client: Arc<ApiClient>, lease: Lease) {
    let answer = Answer { broker: Arc::downgrade(&state.broker), client, lease };
    let now = state.directory.generation();
    REMEMBERED.with_borrow_mut(|memory| memory.keep(digest, body, generation, now, Instant::now(), answer));
}

/// Values by key digest and exact body bytes, each good only under the directory generation it was
/// learnt in and for the directory's time to live. The rules of the memory, apart from what is kept.
struct Memory<T> {
    by_key: HashMap<[u8; 32], ByBody<T>, FastHash>,
    len: usize,
}

/// One key's values, by exact body bytes.
type ByBody<T> = HashMap<Box<[u8]>, Kept<T>, FastHash>;

struct Kept<T> {
    generation: u64,
    learnt_at: Instant,
    value: T,
}

impl<T> Default for Memory<T> {
    fn default() -> Self {
        Self { by_key: HashMap::default(), len: 0 }
    }
}

impl<T> Memory<T> {
    /// The value kept for `digest` and `body`, if it was learnt under `generation` less than the time to
    /// live before `now`. (Generations only grow and time only passes: a value that fails once never
    /// passes again, so the caller forgets it.)
    fn recall(&self, digest: &[u8; 32], body: &[u8], generation: u64, now: Instant) -> Option<&T> {
        let kept = self.by_key.get(digest)?.get(body)?;
        let current =
            kept.generation == generation && now.saturating_duration_since(kept.learnt_at) < directory::TIME_TO_LIVE;
        current.then_some(&kept.value)
    }

    /// Keeps `value`, learnt by lookups that began under generation `learnt_under`, unless the
    /// generation has moved since (`current`): something changed while they looked. Bodies over
    /// [`LONGEST_BODY`] are not kept; at [`CAPACITY`] the memory starts over.
    fn keep(&mut self, digest: &[u8; 32], body: &[u8], learnt_under: u64, current: u64, now: Instant, value: T) {
        if body.len() > LONGEST_BODY || current != learnt_under {
            return;
        }
        if self.len >= CAPACITY {
            self.by_key.clear();
            self.len = 0;
        }
        let kept = Kept { generation: learnt_under, learnt_at: now, value };
        if self.by_key.entry(*digest).or_default().insert(body.into(), kept).is_none() {
            self.len += 1;
        }
    }

    fn forget(&mut self, digest: &[u8; 32], body: &[u8]) {
        if let Some(by_body) = self.by_key.get_mut(digest)
            && by_body.remove(body).is_some()
        {
            self.len -= 1;
            if by_body.is_empty() {
                self.by_key.remove(digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const KEY: [u8; 32] = [1; 32];
    const BODY: &[u8] = br#"{"account_id":"a","scopes":["s"]}"#;

    fn learnt(generation: u64, at: Instant) -> Memory<&'static str> {
        let mut memory = Memory::default();
        memory.keep(&KEY, BODY, generation, generation, at, "answer");
        memory
    }

    #[test]
    fn an_answer_is_recalled_for_the_same_key_body_and_generation_within_the_time_to_live() {
        let at = Instant::now();
        let memory = learnt(7, at);
        assert_eq!(
            memory.recall(&KEY, BODY, 7, at + directory::TIME_TO_LIVE - Duration::from_millis(1)),
            Some(&"answer")
        );
        assert_eq!(memory.recall(&KEY, BODY, 7, at), Some(&"answer"), "recalling keeps it");
    }

    #[test]
    fn another_key_or_other_bytes_recall_nothing() {
        let at = Instant::now();
        let memory = learnt(7, at);
        assert_eq!(memory.recall(&[2; 32], BODY, 7, at), None, "the same body under another key");
        assert_eq!(memory.recall(&KEY, br#"{"account_id":"a","scopes":["s"] }"#, 7, at), None);
    }

    #[test]
    fn a_moved_generation_recalls_nothing() {
        let at = Instant::now();
        let memory = learnt(7, at);
        assert_eq!(memory.recall(&KEY, BODY, 8, at), None);
    }

    #[test]
    fn an_answer_as_old_as_the_directory_time_to_live_recalls_nothing() {
        // The bound should a NOTIFY be lost: the directory itself re-reads after this long.
        let at = Instant::now();
        let memory = learnt(7, at);
        assert_eq!(memory.recall(&KEY, BODY, 7, at + directory::TIME_TO_LIVE), None);
    }

    #[test]
    fn a_forgotten_answer_is_gone_and_no_longer_counted() {
        let at = Instant::now();
        let mut memory = learnt(7, at);
        memory.forget(&KEY, BODY);
        memory.forget(&KEY, BODY);
        assert_eq!(memory.recall(&KEY, BODY, 7, at), None);
        assert_eq!((memory.len, memory.by_key.len()), (0, 0));
    }

    #[test]
    fn nothing_is_kept_when_the_generation_moved_while_the_lookups_ran() {
        let at = Instant::now();
        let mut memory = Memory::default();
        memory.keep(&KEY, BODY, 7, 8, at, "answer");
        assert_eq!(memory.recall(&KEY, BODY, 7, at), None);
        assert_eq!(memory.recall(&KEY, BODY, 8, at), None, "nor under the new generation");
        assert_eq!(memory.len, 0);
    }

    #[test]
    fn long_bodies_are_not_kept() {
        let at = Instant::now();
        let mut memory = Memory::default();
        let long = vec![b' '; LONGEST_BODY + 1];
        memory.keep(&KEY, &long, 7, 7, at, "answer");
        assert_eq!(memory.recall(&KEY, &long, 7, at), None);
        memory.keep(&KEY, &long[..LONGEST_BODY], 7, 7, at, "answer");
        assert_eq!(memory.recall(&KEY, &long[..LONGEST_BODY], 7, at), Some(&"answer"));
    }

    #[test]
    fn at_capacity_the_memory_starts_over_and_stays_bounded() {
        let at = Instant::now();
        let mut memory = Memory::default();
        for n in 0..CAPACITY {
            memory.keep(&KEY, n.to_string().as_bytes(), 7, 7, at, n);
        }
        assert_eq!(memory.len, CAPACITY);
        assert_eq!(memory.recall(&KEY, b"0", 7, at), Some(&0));
        memory.keep(&KEY, b"new", 7, 7, at, usize::MAX);
        assert_eq!(memory.len, 1);
        assert_eq!(memory.recall(&KEY, b"0", 7, at), None);
        assert_eq!(memory.recall(&KEY, b"new", 7, at), Some(&usize::MAX));
    }

    #[test]
    fn keeping_the_same_request_again_replaces_it_without_growing() {
        let at = Instant::now();
        let mut memory = learnt(7, at);
        memory.keep(&KEY, BODY, 9, 9, at, "newer");
        assert_eq!(memory.len, 1);
        assert_eq!(memory.recall(&KEY, BODY, 9, at), Some(&"newer"));
    }
}
