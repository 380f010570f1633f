//! Hardening of the serving process, which holds every approved DEK in
//! memory: no core dump and no same-user ptrace (`PR_SET_DUMPABLE` 0,
//! `RLIMIT_CORE` 0), and all of its memory locked against swapping where
//! RLIMIT_MEMLOCK allows it (docs/KEYS.md, "Keys in the serving process").

use nix::sys::mman::{mlockall, MlockAllFlags};
use nix::sys::prctl;
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// A hardening step the system refused.
#[derive(Debug, thiserror::Error)]
#[error("cannot turn off core dumps and ptrace: {0}")]
pub struct HardeningError(#[from] nix::Error);

/// What `harden` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardening {
    /// Whether every page of the process is locked in memory.
    pub memory_locked: bool,
}

/// Turns core dumps and ptrace off (an error if the system refuses: the
/// proxy then does not serve), then locks memory if allowed.
pub fn harden() -> Result<Hardening, HardeningError> {
    disable_core_dumps()?;
    Ok(Hardening {
        memory_locked: lock_memory(),
    })
}

/// Not dumpable: no core file, and processes of the same user cannot
/// ptrace it or read its /proc memory.
fn disable_core_dumps() -> Result<(), HardeningError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    prctl::set_dumpable(false)?;
    Ok(())
}

/// Locks current and future pages, only when RLIMIT_MEMLOCK is unlimited:
/// with a finite limit, `MCL_FUTURE` would make allocations past it fail,
/// which stops the process instead of protecting it.
fn lock_memory() -> bool {
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == RLIM_INFINITY => {
            mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_and_ptrace_are_off() {
        disable_core_dumps().unwrap();
        assert!(!prctl::get_dumpable().unwrap());
        assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, 0));
    }
}
