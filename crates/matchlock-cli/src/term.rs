//! The local terminal: raw mode for `-it`, and its window size.

use std::os::fd::AsFd;

use matchlock_guest_proto::WinSize;
use nix::sys::termios::{self, SetArg, Termios};

/// Puts stdin's terminal in raw mode; restores the previous mode on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

pub fn stdin_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// The terminal size (of stdout, else stdin), defaulting to 24x80.
pub fn size() -> WinSize {
    let sz = terminal_size::terminal_size_of(std::io::stdout())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin()));
    match sz {
        Some((terminal_size::Width(cols), terminal_size::Height(rows))) if rows > 0 && cols > 0 => {
            WinSize { rows, cols }
        }
        _ => WinSize { rows: 24, cols: 80 },
    }
}
