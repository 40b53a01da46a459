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
    static REMEMBERED: RefCell<Remembered> = RefCell::new(Remembered::default());
}

/// What a token request found, and what it rests on.
struct Answer {
    broker: Weak<Broker>,
    generation: u64,
    learnt_at: Instant,
    client: Arc<ApiClient>,
    lease: Lease,
}

/// One key's answers, by exact body bytes.
type ByBody = HashMap<Box<[u8]>, Answer, FastHash>;

#[derive(Default)]
struct Remembered {
    /// By key digest.
    answers: HashMap<[u8; 32], ByBody, FastHash>,
    len: usize,
}

/// The token for a request seen before on this thread, if everything its answer rests on is unchanged
/// (`generation`: the directory's, read now). On `None` the caller takes the hot path.
pub fn replay(state: &AppState, generation: u64, digest: &[u8; 32], body: &[u8]) -> Option<Arc<Token>> {
    let broker = &state.broker;
    REMEMBERED.with_borrow_mut(|remembered| {
        let by_body = remembered.answers.get_mut(digest)?;
        let answer = by_body.get(body)?;
        let current = std::ptr::eq(answer.broker.as_ptr(), Arc::as_ptr(broker))
            && answer.generation == generation
            && answer.learnt_at.elapsed() < directory::TIME_TO_LIVE;
        let token = if current { broker.serve_again(&answer.lease) } else { None };
        match &token {
            Some(_) => super::tokens::record_on_span(&answer.client, answer.lease.installation()),
            None => {
                by_body.remove(body);
                remembered.len -= 1;
            }
        }
        token
    })
}

/// Remembers what a request found; `generation` is the directory's, read before the request looked
/// anything up. Not remembered if anything changed since.
pub fn learn(state: &AppState, generation: u64, digest: &[u8; 32], body: &[u8], client: Arc<ApiClient>, lease: Lease) {
    if body.len() > LONGEST_BODY || state.directory.generation() != generation {
        return;
    }
    let answer = Answer { broker: Arc::downgrade(&state.broker), generation, learnt_at: Instant::now(), client, lease };
    REMEMBERED.with_borrow_mut(|remembered| {
        if remembered.len >= CAPACITY {
            remembered.answers.clear();
            remembered.len = 0;
        }
        let by_body = remembered.answers.entry(*digest).or_default();
        if by_body.insert(body.into(), answer).is_none() {
            remembered.len += 1;
        }
    });
}
