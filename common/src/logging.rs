//! One tracing setup for both daemons: JSON (journald, log shippers) or text on stderr,
//! the level from `NODECRYPT_LOG` (an `EnvFilter` directive; `info` by default).

/// Installs the global subscriber. `quiet` are extra directives a daemon needs (e.g. a
/// dependency's module whose warnings are noise there). Call once, at the top of `main`.
pub fn init(format: &str, quiet: &[&str]) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("NODECRYPT_LOG")
        .unwrap_or_else(|_| "info".into());
    for d in quiet {
        match d.parse() {
            Ok(d) => filter = filter.add_directive(d),
            Err(e) => eprintln!("ignoring log directive {d:?}: {e}"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
