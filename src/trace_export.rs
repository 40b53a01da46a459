//! Optional OpenTelemetry trace export over OTLP, configured only by the standard `OTEL_*` environment
//! variables and off unless an OTLP endpoint is named. The spans exported are the `tracing` spans the
//! service already makes (a root span per request, with the caller's W3C `traceparent` as its parent);
//! none carries a body, a token, a secret or an `Authorization` header, as for the logs.
//!
//! Variables read here (the SDK reads the rest itself: `OTEL_EXPORTER_OTLP_*_HEADERS`, `*_TIMEOUT`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`):
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`: set, export is on;
//! - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: off whatever else is set;
//! - `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (the default)
//!   or `http/json`; `grpc` is not built in and stops the process at start, naming the variable.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The service name spans carry when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
const DEFAULT_SERVICE_NAME: &str = "tokenvault";

/// Whether spans are exported, for code that makes spans only when someone reads them.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What the `OTEL_*` variables ask for, when they turn export on.
#[derive(Debug, PartialEq, Eq)]
pub struct ExportConfig {
    protocol: Protocol,
    /// Set when the variables name no service, so spans say whose they are.
    default_service_name: bool,
}

impl ExportConfig {
    /// Reads the variables through `lookup` (the process environment in production). `Ok(None)`: off.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let set = |name: &str| lookup(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        if let Some(exporter) = set("OTEL_TRACES_EXPORTER") {
            match exporter.to_ascii_lowercase().as_str() {
                "none" => return Ok(None),
                "otlp" => {}
                other => bail!("OTEL_TRACES_EXPORTER={other:?} is not supported: use otlp or none"),
            }
        }
        if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return Ok(None);
        }
        let (variable, protocol) = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(protocol)),
            None => ("OTEL_EXPORTER_OTLP_PROTOCOL", set("OTEL_EXPORTER_OTLP_PROTOCOL")),
        };
        let protocol = match protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("http/protobuf") => Protocol::HttpBinary,
            Some("http/json") => Protocol::HttpJson,
            Some("grpc") => bail!(
                "{variable}=grpc: tokenvault exports OTLP over HTTP only; set it to http/protobuf (and the \
                 collector's HTTP port, usually 4318)"
            ),
            Some(other) => bail!("{variable}={other:?} is not an OTLP protocol: use http/protobuf or http/json"),
        };
        let names_service = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES")
                .is_some_and(|attributes| attributes.split(',').any(|pair| pair.trim().starts_with("service.name=")));
        Ok(Some(Self { protocol, default_service_name: !names_service }))
    }

    /// Reads the process environment.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }
}

/// The exporting tracer provider; dropping it sends the spans still queued (up to the SDK's timeout).
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Starts the exporter (a background thread that batches spans and posts them).
    pub fn start(config: &ExportConfig) -> anyhow::Result<Self> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(config.protocol)
            .build()
            .context("cannot set up the OTLP trace exporter from the OTEL_* variables")?;
        let mut resource = Resource::builder();
        if config.default_service_name {
            resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
        }
        let resource =
            resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans of this provider.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tokenvault"))
    }
}

impl Drop for TraceExport {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(error = %error, "the last spans could not be exported");
        }
    }
}

/// Makes the caller's W3C trace context (`traceparent`, `tracestate`) the parent of `span`, so the
/// exported request span joins the caller's trace. Does nothing unless spans are exported.
///
/// Written here rather than taken from tracing-actix-web, whose OpenTelemetry features stop at an older
/// `opentelemetry` than the exporter this service uses.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !exporting() || span.is_none() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
}

/// Request headers as a propagator reads them.
struct Headers<'a>(&'a actix_web::http::header::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> anyhow::Result<Option<ExportConfig>> {
        ExportConfig::from_lookup(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_named() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(config(&[("OTEL_TRACES_EXPORTER", "otlp"), ("OTEL_SERVICE_NAME", "tv")]).unwrap(), None);
        assert_eq!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap(), None);
        let on = ExportConfig { protocol: Protocol::HttpBinary, default_service_name: true };
        assert_eq!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap(), Some(on));
        let traces_only = config(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces")]).unwrap();
        assert!(traces_only.is_some());
    }

    #[test]
    fn sdk_disabled_or_exporter_none_turns_it_off_and_other_exporters_are_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(config(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]).unwrap(), None);
        assert_eq!(config(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(), None);
        assert!(config(&[endpoint, ("OTEL_SDK_DISABLED", "false")]).unwrap().is_some());
        let zipkin = config(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err().to_string();
        assert!(zipkin.contains("OTEL_TRACES_EXPORTER"), "{zipkin}");
    }

    #[test]
    fn the_protocol_is_http_and_grpc_is_refused_naming_the_variable() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let protocol = |vars: &[(&str, &str)]| config(&[&[endpoint], vars].concat()).map(|c| c.unwrap().protocol);
        assert_eq!(protocol(&[]).unwrap(), Protocol::HttpBinary);
        assert_eq!(protocol(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap(), Protocol::HttpJson);
        // The per-signal variable wins over the general one.
        let both = [("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")];
        assert_eq!(protocol(&both).unwrap(), Protocol::HttpBinary);
        let grpc = protocol(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err().to_string();
        assert!(grpc.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc") && grpc.contains("http/protobuf"), "{grpc}");
        let odd = protocol(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")]).unwrap_err().to_string();
        assert!(odd.contains("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"), "{odd}");
    }

    #[test]
    fn the_service_is_named_tokenvault_unless_the_variables_name_it() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert!(config(&[endpoint]).unwrap().unwrap().default_service_name);
        assert!(!config(&[endpoint, ("OTEL_SERVICE_NAME", "tv-eu")]).unwrap().unwrap().default_service_name);
        let attributes = ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod, service.name=tv-eu");
        assert!(!config(&[endpoint, attributes]).unwrap().unwrap().default_service_name);
        let other = ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod");
        assert!(config(&[endpoint, other]).unwrap().unwrap().default_service_name);
    }
}
