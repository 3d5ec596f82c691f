//! Succeeds without doing anything: measures the host's per-message cost.

use sluice_sdk::{handler, Error, Message};

handler!(handle);

fn handle(_msg: Message) -> Result<(), Error> {
    Ok(())
}
