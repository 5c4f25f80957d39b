//! `skyline demo migration`: placeholder.
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {}

#[derive(Debug, thiserror::Error)]
#[error("demo failed: {0}")]
pub struct DemoError(String);

pub async fn run(
    _args: DemoArgs,
    _shutdown: CancellationToken,
    _out: &mut dyn std::io::Write,
) -> Result<(), DemoError> {
    Ok(())
}
