//! The guest's side of a shutdown (qemu-server `_do_vm_stop` with `$shutdown`): the ACPI
//! power button is pressed and the task waits up to `timeout` seconds (default 60) for the
//! guest to power off. A guest that needs longer than that (its `shutdown_seconds`), or
//! that ignores ACPI (set with [`crate::SimHandle::set_guest_acpi`]: a hung or booting
//! OS), times the task out with `VM quit/powerdown failed - got timeout`, unless
//! `forceStop` is set: then the VM is killed and the task ends with a warning.

use crate::state::Shared;
use crate::tasks::{Outcome, TaskCtx};

/// A shutdown's options, as the API call gave them.
#[derive(Clone, Copy, Debug)]
pub(super) struct ShutdownOpts {
    pub timeout: Option<i64>,
    pub force_stop: bool,
}

/// Runs the guest's shutdown of a running VM. `None`: it powered off in time (the caller
/// marks it stopped); otherwise the task's outcome (the VM is stopped when forced).
pub(super) async fn guest_shutdown(
    ctx: &mut TaskCtx,
    vmid: u32,
    opts: ShutdownOpts,
) -> Option<Outcome> {
    let app = ctx.app.clone();
    let timeout = opts.timeout.unwrap_or(60).max(0) as f64;
    let responds = !app.state.lock().acpi_ignored.contains(&vmid);
    let needs = app.costs.shutdown_seconds;
    if responds && needs <= timeout {
        return None;
    }
    ctx.spend(timeout).await;
    if !opts.force_stop {
        return Some(Outcome::Error(
            "VM quit/powerdown failed - got timeout".into(),
        ));
    }
    ctx.log("VM still running - terminating now with SIGTERM");
    set_stopped(&app, vmid);
    Some(Outcome::Warnings(1))
}

fn set_stopped(app: &Shared, vmid: u32) {
    if let Some(vm) = app.state.lock().vms.get_mut(&vmid) {
        vm.running = false;
        vm.started = None;
    }
}

impl Shared {
    /// Whether the guest of `vmid` reacts to the ACPI power button.
    pub(crate) fn set_guest_acpi(&self, vmid: u32, responds: bool) {
        let mut st = self.state.lock();
        if responds {
            st.acpi_ignored.remove(&vmid);
        } else {
            st.acpi_ignored.insert(vmid);
        }
    }

    /// Counts a start's boot on `node` for the high-water marks, until [`Shared::start_booted`].
    pub(super) fn start_booting(&self, node: &str) {
        self.state.lock().stats.start_begin(node);
    }

    pub(super) fn start_booted(&self, node: &str) {
        self.state.lock().stats.start_end(node);
    }
}
