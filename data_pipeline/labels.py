"""Label vocabularies of the supported datasets, in their canonical order."""

# ChestX-ray14 (Wang et al. 2017): the 14 findings in the order every paper reports them.
CXR14_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CXR14_NO_FINDING = "No Finding"

# FETAL_PLANES_DB (Burgos-Artizzu et al. 2020): the 6 planes, single-label.
FETAL_PLANES = (
    "Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other",
)
