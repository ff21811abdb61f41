pub struct MmioTransport;
