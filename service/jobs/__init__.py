"""The job engine: request parsing, images, job handles, the scheduler that batches jobs onto one
device, reference statistics and batch-invariant kernels. Knows nothing of the gRPC server."""
