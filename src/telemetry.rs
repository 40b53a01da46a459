//! The tracing subscriber: JSON lines in production, human-readable in development; level from `RUST_LOG`.
//! Nothing in this service logs a body, a token, a secret or an Authorization header.

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::LogFormat;
use crate::trace_export::TraceExport;

/// Installs the global subscriber, writing to stderr (stdout is reserved for command output such as a
/// new service key), and with `export` the OpenTelemetry layer that sends spans over OTLP. Safe to call
/// once per process.
pub fn init(format: LogFormat, export: Option<&TraceExport>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => {
            let lines = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true);
            logs.json().event_format(WithRequestId(lines)).boxed()
        }
        LogFormat::Pretty => {
            logs.pretty().event_format(WithRequestId(tracing_subscriber::fmt::format().pretty())).boxed()
        }
    };
    // RUST_LOG filters the logs only: exported spans are the request spans (INFO), whatever it says.
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(export.map(|export| export.layer().with_filter(LevelFilter::INFO)))
        .try_init();
}

/// Puts the id of the request being answered on every log line written while answering it, as
/// `request_id`, without a span per request: on the internal listener's hot path a span costs as much as
/// a cached token, while this costs a task-local read per line written, and nothing when none is.
struct WithRequestId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithRequestId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(id) = crate::request_context::request_id() else {
            return self.0.format_event(context, writer, event);
        };
        // Request ids are URL-safe characters only (routes::observe), so they need no JSON escaping.
        if writer.has_ansi_escapes() {
            // A terminal: a line of its own above the event keeps the formatter's colours.
            writeln!(writer, "  request_id: {id}")?;
            return self.0.format_event(context, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(context, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(fields) => write!(writer, "{{\"request_id\":\"{id}\",{fields}"),
            None => write!(writer, "  request_id: {id}\n{line}"),
        }
    }
}

/// Bucket bounds (seconds) of every histogram: from half a millisecond (a cached token) to ten seconds
/// (an upstream call at its timeout).
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder), with real
/// histograms (buckets, not summaries) and a HELP text for every series.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a test harness); metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
            metrics::gauge!("tokenvault_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// The HELP text of every series (keep README's metrics table in step).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("tokenvault_callbacks_total", "Callbacks received, by outcome or problem code.");
    describe_counter!("tokenvault_token_requests_total", "Token requests, by outcome (ok or a problem code).");
    describe_counter!(
        "tokenvault_token_cache_total",
        "Tokens served from memory, read from the shared table, or minted."
    );
    describe_counter!("tokenvault_token_refresh_ahead_total", "Background renewals started.");
    describe_counter!(
        "tokenvault_token_waits_total",
        "Token requests that waited: for the shared table, their own mint, or queued behind another."
    );
    describe_counter!("tokenvault_token_served_degraded_total", "Still-valid tokens served because a mint failed.");
    describe_counter!("tokenvault_token_scope_exceeded_total", "Tokens withheld: granted scopes beyond the key's.");
    describe_counter!(
        "tokenvault_invalidation_listener_lost_total",
        "Times the change listener was lost and replaced."
    );
    describe_counter!("tokenvault_upstream_requests_total", "Calls to token endpoints, by HTTP status or failure.");
    describe_histogram!(
        "tokenvault_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Duration of each call to a token endpoint."
    );
    describe_histogram!(
        "tokenvault_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Duration of each HTTP request, by listener, route and status class."
    );
    describe_counter!("tokenvault_jwks_refresh_total", "Fetches of Trackunit's JWKS, by result.");
    describe_counter!("tokenvault_rejection_probes_total", "Probes of rejected installations, by outcome.");
    describe_counter!(
        "tokenvault_installations_reactivated_total",
        "Rejected installations made active again, by whom."
    );
    describe_counter!(
        "tokenvault_log_lines_suppressed_total",
        "Log lines not written because of a rate limit, by event."
    );
    describe_gauge!("tokenvault_build_info", "1, labelled with the running version.");
    describe_gauge!("tokenvault_tokens_in_memory", "Access tokens this replica holds in memory.");
    describe_gauge!("tokenvault_installations", "Installations by status (every replica reports the same count).");
    describe_gauge!("tokenvault_database_connections", "Pooled database connections of this replica, in use or idle.");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber with `format` writes for one event inside a request and one outside any.
    async fn lines_written(format: LogFormat) -> String {
        let written = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&written);
        let make_writer = move || SharedBuffer(Arc::clone(&sink));
        let logs = tracing_subscriber::fmt().with_writer(make_writer).with_ansi(false);
        let dispatch = match format {
            LogFormat::Json => tracing::Dispatch::new(
                logs.json()
                    .event_format(WithRequestId(tracing_subscriber::fmt::format().json().flatten_event(true)))
                    .finish(),
            ),
            LogFormat::Pretty => tracing::Dispatch::new(
                logs.pretty().event_format(WithRequestId(tracing_subscriber::fmt::format().pretty())).finish(),
            ),
        };
        let _default = tracing::dispatcher::set_default(&dispatch);
        let context = crate::request_context::Context { request_id: Some(Arc::from("req-7")), actor: None };
        crate::request_context::scope(context, async { tracing::info!(answer = 42, "inside the request") }).await;
        tracing::info!("outside any request");
        String::from_utf8(written.lock().unwrap().clone()).unwrap()
    }

    #[derive(Clone)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_json_line_written_while_answering_a_request_carries_its_id_and_stays_json() {
        let written = lines_written(LogFormat::Json).await;
        let lines: Vec<serde_json::Value> = written.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{written}");
        assert_eq!(
            (&lines[0]["request_id"], &lines[0]["answer"]),
            (&serde_json::json!("req-7"), &serde_json::json!(42))
        );
        assert!(lines[1].get("request_id").is_none(), "no request, no id: {}", lines[1]);
    }

    #[tokio::test]
    async fn a_pretty_event_written_while_answering_a_request_names_its_id() {
        let written = lines_written(LogFormat::Pretty).await;
        let inside = written.find("inside the request").expect("the event");
        let outside = written.find("outside any request").expect("the event");
        let id = written.find("request_id: req-7").expect("the id");
        assert!(id < inside, "{written}");
        assert_eq!(written.matches("request_id").count(), 1, "only the request's event: {written}");
        assert!(outside > inside);
    }
}
