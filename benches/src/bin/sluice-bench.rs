//! `sluice-bench`: see [`sluice_benches::tool`] and DESIGN.md, "Command line".

fn main() -> std::process::ExitCode {
    sluice_benches::tool::main()
}
