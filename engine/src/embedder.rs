//! What the engine asks of the program whose memory it migrates (a VMM, the bench).

/// The source embedder: pauses and resumes the guest, throttles it, hands over device state.
pub trait SourceEmbedder: Send {
    /// Stops the guest for the final copy (stop-and-copy). Must not return while a guest
    /// write can still land.
    fn pause(&mut self) -> Result<(), String>;
    /// Lets the guest run again on the source after a migration that failed or was
    /// cancelled past the pause.
    fn resume(&mut self);
    /// Slows the guest to let pre-copy converge (auto-converge); `percent` of its CPU time is
    /// taken away. 0 lifts the throttle.
    fn throttle(&mut self, _percent: u8) {}
    /// The embedder's own state (for a VMM: device state), taken after the pause.
    fn device_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
}

/// The destination embedder: receives device state and takes over the guest.
pub trait DestEmbedder: Send {
    /// The source's device state, handed over after every RAM byte has landed and verified.
    fn load_device_state(&mut self, _state: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
    /// Starts the guest on the destination; the migration is complete after this.
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A source embedder with nothing to pause (memory that no one writes).
#[derive(Debug, Default)]
pub struct StaticSource;

impl SourceEmbedder for StaticSource {
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) {}
}

/// A destination embedder that takes nothing and resumes nothing.
#[derive(Debug, Default)]
pub struct NullDest {
    /// The device state received, if any.
    pub device_state: Option<Vec<u8>>,
}

impl DestEmbedder for NullDest {
    fn load_device_state(&mut self, state: Vec<u8>) -> Result<(), String> {
        self.device_state = Some(state);
        Ok(())
    }
}
