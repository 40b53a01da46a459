//! Who is asking, and in which request, for the work done on its behalf: the audit trail records both,
//! problem bodies name the request. Set by the HTTP middleware (the request id), by authentication (the
//! admin key's client), and by the CLI (`cli`); carried across `routes::offload` into the spawned task.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static CONTEXT: RefCell<Context>;
}

/// The request and actor of the current task, where one is known.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub request_id: Option<Arc<str>>,
    /// `callback`, `cli`, `prober`, or `client:<name>` (an admin key's client).
    pub actor: Option<Arc<str>>,
}

/// Runs `work` within `context`.
pub async fn scope<T>(context: Context, work: impl Future<Output = T>) -> T {
    CONTEXT.scope(RefCell::new(context), work).await
}

/// The current task's context (empty outside any).
pub fn current() -> Context {
    CONTEXT.try_with(|context| context.borrow().clone()).unwrap_or_default()
}

/// The current task's request id, if it answers a request (every log line carries it).
pub fn request_id() -> Option<Arc<str>> {
    CONTEXT.try_with(|context| context.borrow().request_id.clone()).ok().flatten()
}

/// Names who acts for the rest of the current task's work.
pub fn set_actor(actor: impl Into<Arc<str>>) {
    let _ = CONTEXT.try_with(|context| context.borrow_mut().actor = Some(actor.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_context_is_the_scopes_and_the_actor_can_be_named_within_it() {
        assert!(current().request_id.is_none(), "none outside a scope");
        let context = Context { request_id: Some(Arc::from("r-1")), actor: None };
        scope(context, async {
            set_actor("client:ops");
            let now = current();
            assert_eq!((now.request_id.as_deref(), now.actor.as_deref()), (Some("r-1"), Some("client:ops")));
        })
        .await;
        set_actor("nobody");
        assert!(current().actor.is_none(), "setting outside a scope does nothing");
    }
}
