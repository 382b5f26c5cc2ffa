"""Drop-in nn.Modules backed by mmfast's fused ops (filled in below)."""
