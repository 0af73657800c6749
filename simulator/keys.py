"""Record keys shared by the server side (strategies, engine) and the clients.

Flower's strategies read and write these names; keeping them in one place keeps
the two sides from drifting apart.
"""

NUM_EXAMPLES = "num-examples"  # weight of a reply in FedAvg-family aggregation
SERVER_ROUND = "server-round"  # Flower injects it into every train config
PROXIMAL_MU = "proximal-mu"  # FedProx's proximal term weight, sent by the strategy
CLIPPING_NORM = "clipping_norm"  # client-side DP: clip the update to this L2 norm
NORM_BIT = "norm_bit"  # client-side adaptive DP: was the update within the norm
TRAIN_LOSS = "train_loss"  # mean local training loss (QFedAvg reads it)
ACCURACY = "accuracy"
EVAL_LOSS = "eval_loss"
LEARNING_RATE = "lr"  # a strategy's per-round client learning rate (Flower's convention)
