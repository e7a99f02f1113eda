//! The error type of the data crate: every variant names the file (or hub file) it is about.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading, validating or decoding a dataset.
///
/// Each variant carries the path of the file (or directory) at fault, and its message says
/// what was expected and what was found. Matching on the variant tells the kind of problem.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading a file or listing a directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file or directory that the format needs is missing.
    #[error("{}: not found: expected {expected}", path.display())]
    NotFound {
        /// Where it was looked for (the directory, or the first candidate file name).
        path: PathBuf,
        /// What should have been there.
        expected: String,
    },

    /// The magic number at the start of a file is not the format's.
    #[error("{}: bad magic number: expected {expected:#010x}, found {found:#010x}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The format's magic number.
        expected: u32,
        /// The number in the file.
        found: u32,
    },

    /// A header field is impossible (zero or absurdly large dimensions, wrong rank).
    #[error("{}: invalid header: {message}", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the values found.
        message: String,
    },

    /// The file (or decompressed stream) is shorter than its header or format says.
    #[error("{}: truncated: expected {expected} bytes, found {found}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header or format implies.
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },

    /// The file holds more bytes than its header implies, or is not a whole number of records.
    #[error("{}: wrong size: expected {expected}, found {found} bytes", path.display())]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// What the header or record format implies.
        expected: String,
        /// Bytes actually present.
        found: u64,
    },

    /// A header implies more data than this loader accepts (a hostile or corrupt header).
    #[error(
        "{}: header claims {claimed} bytes of data, more than the limit of {limit} bytes for this file",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        claimed: u64,
        /// The largest size accepted (absolute cap, or what the compressed file can hold).
        limit: u64,
    },

    /// A gzip stream is corrupt or ends early.
    #[error("{}: broken gzip stream: {source}", path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: std::io::Error,
    },

    /// The image and label files of a split disagree on the number of examples.
    #[error(
        "{}: {labels} labels, but {} holds {images} images",
        labels_path.display(),
        images_path.display()
    )]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// The label file.
        labels_path: PathBuf,
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },

    /// A label is outside `0..num_classes`.
    #[error(
        "{}: label {label} of example {index} is out of range: expected a label below {num_classes}",
        path.display()
    )]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// The example's position in the file.
        index: usize,
        /// The label found.
        label: i64,
        /// Number of classes of the format.
        num_classes: usize,
    },

    /// An image file does not decode.
    #[error("{}: cannot decode image: {source}", path.display())]
    Decode {
        /// The file (for parquet: the file and row).
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },

    /// Images of one dataset do not all have the same shape.
    #[error(
        "{}: image is {found:?} (C, H, W), expected {expected:?} like the first image of the dataset",
        path.display()
    )]
    ShapeMismatch {
        /// The file with the odd image.
        path: PathBuf,
        /// The shape of the first image.
        expected: [usize; 3],
        /// The shape of this image.
        found: [usize; 3],
    },

    /// A class folder holds no image files.
    #[error("{}: empty class folder: expected at least one .png/.jpg/.jpeg file", path.display())]
    EmptyClass {
        /// The class folder.
        path: PathBuf,
    },

    /// The train and test splits of an image folder have different classes.
    #[error("{}: classes {found:?} differ from the train split's {expected:?}", path.display())]
    ClassMismatch {
        /// The split folder.
        path: PathBuf,
        /// The train split's classes.
        expected: Vec<String>,
        /// This split's classes.
        found: Vec<String>,
    },

    /// A class-name (meta) file does not list the expected number of names.
    #[error("{}: expected {expected} class names, found {found}", path.display())]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// Number of classes of the format.
        expected: usize,
        /// Number of non-empty lines in the file.
        found: usize,
    },

    /// A parquet file is unreadable or lacks the expected columns.
    #[error("{}: bad parquet file: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The Hugging Face hub could not provide a file (offline cache miss, network, no such file).
    #[error("hub dataset {repo}, file {file}: {source}")]
    Hub {
        /// The dataset repository id.
        repo: String,
        /// The file in the repository.
        file: String,
        /// Why the hub could not provide it.
        source: Box<tau_hub::HubError>,
    },

    /// The requested data source needs a directory and none was given.
    #[error("{source_name}: needs a directory: {hint}")]
    NeedsDir {
        /// The data source's name.
        source_name: String,
        /// How to give one.
        hint: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
