"""Every AnnData key perturbkit reads or writes, in one place."""

# obs columns of the bundled, harmonised datasets
CONDITION = "condition"
CONTEXT = "cell_type"
DONOR = "donor"

# labels of the bundled datasets
CONTROL = "control"
PERTURBED = "stimulated"

# written only into AnnData objects perturbkit creates itself (predictions), never into the user's input
PRED_FLAG = "perturbkit_predicted"
UNS_PREPROCESS = "perturbkit_preprocessing"
