"""How the parties talk: frames, tensors as bytes, a client's link, and the relay.

Imports nothing of the engine or the notebook; the relay and the frame code
import no torch.
"""
