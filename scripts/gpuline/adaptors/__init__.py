"""Adaptors for optional cloud SDKs: the only modules that import them, always lazily.

Each adaptor imports its SDK inside functions, builds its clients and says what its errors mean in
gpuline's terms, so the rest of the package never names the SDK and importing it costs nothing
until a client is actually built.
"""
