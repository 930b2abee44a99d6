"""Constants shared by every stage: label order, metric weights, CT windows, column names."""

# Kaggle's order of the six labels inside each image's block of rows; prediction tables use it as
# their column order. Never reshape the CSV by position (sorting by ID puts `any` first).
LABELS: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
SUBTYPES: tuple[str, ...] = LABELS[:5]

# Competition metric: per-label binary log loss, `any` weighted 2, each subtype 1, divided by 7.
LABEL_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
# Kaggle clips at 1e-15 when scoring; a confident wrong answer then costs ~34.5.
METRIC_CLIP = 1e-15

# (name, center HU, width HU); the three cached channels, in this order.
WINDOWS: tuple[tuple[str, float, float], ...] = (
    ("brain", 40.0, 80.0),
    ("subdural", 80.0, 200.0),
    ("bone", 600.0, 2800.0),
)

# Acute blood is ~50-90 HU, subacute fades towards 40; brain parenchyma sits at 20-45, CSF at 0-15, bone above 300.
# The soft edges (BLOOD_HU_EDGE HU wide) allow for partial volume, scanner drift and the brightness augmentation.
BLOOD_HU: tuple[float, float] = (40.0, 100.0)
BLOOD_HU_EDGE = 5.0
# Hyperdense but not bone: what a negative slice must hold to be a hard negative for the blood map (config key
# seg_hard_negatives). Above grey matter (~30-40 HU) so plain parenchyma does not count; the falx, venous sinuses,
# vessels, choroid plexus and the partial-volume rim of the skull's inner table fall in it, as acute blood does.
HYPERDENSE_HU: tuple[float, float] = (45.0, 100.0)
# The window blood's Hounsfield range is read back from: 80/200 spans -20..180 HU, so 40-100 HU is neither clipped
# nor coarse (0.78 HU per uint8 code).
BLOOD_WINDOW = "subdural"

# How the image cache stores its uint8 rows (config key cache_format): memmap = raw .npy, read in place; zstd = each
# row compressed on its own (src/data/packed.py), ~5x smaller, decoded when read. Lossless, so both train the same.
CACHE_FORMATS: tuple[str, ...] = ("memmap", "zstd")

AIR_HU = -1024.0  # padding value: air, not 0 (0 HU is water)

# Column names every stage shares (Kaggle's and DICOM's spellings).
ID_COL = "ID"
FOLD_COL = "fold"
VOLUME_COL = "blood_volume_mm3"
PATIENT = "PatientID"
STUDY = "StudyInstanceUID"
SERIES = "SeriesInstanceUID"
SLICE_INDEX = "slice_index"  # 0-based order of a slice along its series' normal
SERIES_KEYS: tuple[str, ...] = (PATIENT, STUDY, SERIES)
