//! The virtio-balloon reporting queue (`balloon::serve`): descriptors,
//! chains, ring indexes and the queue layout come from the input; reported
//! ranges drop the pages of the fuzzer's guest memory (`MADV_DONTNEED` on
//! its private mapping). Whatever the ranges, every buffer comes back with
//! length 0 and the device never panics.

#![no_main]

use devices::virtio::balloon::{serve, QUEUE_SIZE};
use libfuzzer_sys::fuzz_target;
use sandboxvm_fuzz::{check_used, driver_step, guest_memory, Input, QueueSpec};
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = guest_memory();
    let spec = QueueSpec::from_input(&mut inp, QUEUE_SIZE);
    let Some(mut q) = spec.build(&mem, QUEUE_SIZE) else {
        return;
    };
    let strict = inp.strict;
    loop {
        for _ in 0..=(inp.u8() % 4) {
            if !driver_step(&mem, &q, &mut inp) {
                break;
            }
        }
        let old = q.next_used();
        // Reporting, or the inflate and deflate queues (returned unread).
        let discard = inp.u8() & 3 != 0;
        let _ = serve(&mem, &mut q, discard);
        check_used(&mem, &q, old, 0, strict, Some(u32::from(q.size())));
        if inp.is_empty() {
            break;
        }
    }
});
