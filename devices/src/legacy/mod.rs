//! PC legacy devices: the 8250 UART console and the i8042 controller (used
//! by the guest only to reset the machine).

mod console;
mod i8042;
mod serial;

pub use console::{ConsoleEvents, ConsoleWatch};
pub use i8042::I8042;
pub use serial::Serial;
