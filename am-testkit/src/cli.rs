//! Command-line flags for the tools and examples built on the AM layer (`pingpong`,
//! `am-bench`, `coherence-bench`, `store-bench`): `--name value` pairs and bare `--flag`s,
//! no dependency.

/// The `main` of a tool: `-h`/`--help` prints `help`; otherwise `run` gets the arguments,
/// and an error is printed as `name: error` with exit status 2.
pub fn tool_main(name: &str, help: &str, run: impl FnOnce(&Args) -> Result<(), String>) {
    let args = Args::from_env();
    if args.flag("--help") || args.flag("-h") {
        print!("{help}");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("{name}: {e}");
        std::process::exit(2);
    }
}

/// The arguments after the program name.
pub struct Args(pub Vec<String>);

impl Args {
    /// The process's own arguments.
    pub fn from_env() -> Args {
        Args(std::env::args().skip(1).collect())
    }
    /// True if `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
    /// The value after `name`, if given.
    pub fn value(&self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == name)?;
        self.0.get(i + 1).cloned()
    }
    /// The value after `name` parsed, `default` when absent; an error names the flag.
    pub fn parse<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name}: cannot parse {v:?}; see --help")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Args;

    #[test]
    fn flags_values_and_parse_errors() {
        let a = Args(["--n", "7", "--x", "--bad", "q"].map(String::from).to_vec());
        assert!(a.flag("--x") && !a.flag("--y"));
        assert_eq!(a.value("--n").as_deref(), Some("7"));
        assert_eq!(a.parse("--n", 1u32), Ok(7));
        assert_eq!(a.parse("--absent", 3u32), Ok(3));
        let e = a.parse("--bad", 0u32).unwrap_err();
        assert!(e.contains("--bad") && e.contains("\"q\""), "{e}");
    }
}
