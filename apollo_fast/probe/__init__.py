"""The open questions as runnable experiments, each ending in a report with honest uncertainty.

    dose           how many examples move a behaviour (nested subsets, several seeds, a shuffled null)
    learning_rate  the effect over a learning-rate grid, against the damage to general data
    gdn_state      per layer and head: how training changed the recurrent state (and attention K/V)
                   after a context, and whether the state's readout change aligns with a steering vector
    steering       per behaviour and layer: cross-validated separability along the extracted direction,
                   a permutation null, and the steering effect on the held-out margin
    transfer       perplexity (and margins) per evaluation set before vs after, paired bootstrap CIs

Each returns a `Report` (`.data` JSON-ready, `.markdown`, `.figures` PNGs; `.save(DIR)`,
`.write_json(PATH)`); `apollo-fast probe NAME` runs it from the command line. Bad input raises
`ProbeError` (a ValueError) naming the file, line or option.
"""

from .common import StatOptions
from .dose import dose
from .gdn_state import gdn_state
from .inputs import ProbeError
from .lr import learning_rate
from .report import Report
from .steering import steering
from .training import TrainSettings
from .transfer import transfer

__all__ = [
    "Report",
    "ProbeError",
    "StatOptions",
    "TrainSettings",
    "dose",
    "learning_rate",
    "gdn_state",
    "steering",
    "transfer",
]
