// Python bindings of rcgrpo_kernels._C: numpy buffers in, numpy buffers out.
// Every entry point re-checks the sizes (std::invalid_argument -> ValueError) before touching a
// buffer and releases the GIL while the OpenMP kernels run. acd_attention takes q, k, v (and an
// optional preallocated out) with any B, H, N strides and unit stride in D, without a copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "common.h"

namespace py = pybind11;
using rcgrpo::require;

namespace {

template <typename S>
using carray = py::array_t<S, py::array::c_style | py::array::forcecast>;
// float32 arrays with their strides (other dtypes are converted to a dense float32 copy).
using farray = py::array_t<float, py::array::forcecast>;

std::string shape_of(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
    os << (a.ndim() == 1 ? ",)" : ")");
    return os.str();
}

void require_ndim(const py::array& a, py::ssize_t ndim, const char* name, const char* layout) {
    require(a.ndim() == ndim, std::string(name) + " must be " + std::to_string(ndim) + "-D " +
                                  layout + ", got shape " + shape_of(a));
}

/// Element strides of B, H, N of a [B, H, N, D] float32 array; D must have unit stride (a size-1
/// dimension's stride is irrelevant and ignored).
rcgrpo::Strides4 strides_of(const py::array& a, const char* name) {
    const py::ssize_t item = static_cast<py::ssize_t>(sizeof(float));
    int64_t st[4];
    for (int d = 0; d < 4; ++d) {
        require(a.strides(d) % item == 0, std::string(name) + " has strides that are not a multiple of " +
                                              "the float size");
        st[d] = a.shape(d) == 1 ? 0 : static_cast<int64_t>(a.strides(d) / item);
    }
    require(a.shape(3) == 1 || st[3] == 1,
            std::string(name) + " must have unit stride in its last dimension D, got a stride of " +
                std::to_string(st[3]) + " floats");
    return {st[0], st[1], st[2]};
}

py::tuple acd_attention(const farray& q, const farray& k, const farray& v, int64_t text_len,
                        int64_t image_len, double scale,
                        const std::optional<carray<float>>& text_weights, int64_t num_threads,
                        const std::optional<py::array>& out_arg) {
    require_ndim(q, 4, "q", "[B, H, N, D]");
    require_ndim(k, 4, "k", "[B, H, N, D]");
    require_ndim(v, 4, "v", "[B, H, N, D]");
    for (int d = 0; d < 4; ++d) {
        require(k.shape(d) == q.shape(d) && v.shape(d) == q.shape(d),
                "q, k, v must share one shape [B, H, N, D], got q " + shape_of(q) + ", k " +
                    shape_of(k) + ", v " + shape_of(v));
    }
    const int64_t B = q.shape(0), H = q.shape(1), N = q.shape(2), D = q.shape(3);
    require(B >= 1 && H >= 1 && N >= 1 && D >= 1, "q must be non-empty, got shape " + shape_of(q));
    require(text_len >= 1 && image_len >= 1,
            "text_len and image_len must be >= 1, got " + std::to_string(text_len) + " and " +
                std::to_string(image_len));
    require(text_len + image_len <= N, "text_len + image_len = " + std::to_string(text_len) +
                                           " + " + std::to_string(image_len) +
                                           " exceeds the sequence length N = " + std::to_string(N));
    require(std::isfinite(scale) && scale > 0.0,
            "scale must be finite and positive, got " + std::to_string(scale));
    const float* weights = nullptr;
    if (text_weights.has_value()) {
        const carray<float>& w = *text_weights;
        require(w.ndim() == 2 && w.shape(0) == B && w.shape(1) == text_len,
                "text_weights must have shape [B, text_len] = (" + std::to_string(B) + ", " +
                    std::to_string(text_len) + "), got " + shape_of(w));
        weights = w.data();
    }
    const int nt = rcgrpo::resolve_threads(num_threads);
    const rcgrpo::Strides4 qs = strides_of(q, "q"), ks = strides_of(k, "k"), vs = strides_of(v, "v");

    py::array out = out_arg.has_value() ? *out_arg : py::array(carray<float>({B, H, N, D}));
    if (out_arg.has_value()) {
        require(out.dtype().is(py::dtype::of<float>()), "out must be a float32 array");
        require(out.writeable(), "out must be writeable");
        require(out.ndim() == 4 && out.shape(0) == B && out.shape(1) == H && out.shape(2) == N &&
                    out.shape(3) == D,
                "out must have the shape of q " + shape_of(q) + ", got " + shape_of(out));
    }
    const rcgrpo::Strides4 os = strides_of(out, "out");
    carray<float> mass({B, image_len});
    float* out_ptr = static_cast<float*>(out.mutable_data());
    float* mass_ptr = mass.mutable_data();
    {
        py::gil_scoped_release release;
        rcgrpo::acd_attention_cpu(q.data(), qs, k.data(), ks, v.data(), vs, weights, out_ptr, os,
                                  mass_ptr, B, H, N, D, text_len, image_len,
                                  static_cast<float>(scale), nt);
    }
    return py::make_tuple(out, mass);
}

template <typename S>
void check_region(const carray<S>& x, const carray<S>& y, const carray<S>& mask) {
    require_ndim(x, 3, "x", "[T, G, D]");
    require_ndim(y, 3, "y", "[T, K, D]");
    require_ndim(mask, 1, "mask", "[D]");
    require(y.shape(0) == x.shape(0) && y.shape(2) == x.shape(2),
            "y must have shape [T, K, D] matching x " + shape_of(x) + ", got " + shape_of(y));
    require(mask.shape(0) == x.shape(2),
            "mask must have shape [D] = (" + std::to_string(x.shape(2)) + ",), got " + shape_of(mask));
    require(x.shape(0) >= 1 && x.shape(1) >= 1 && x.shape(2) >= 1 && y.shape(1) >= 1,
            "x and y must be non-empty, got x " + shape_of(x) + ", y " + shape_of(y));
}

template <typename S>
carray<S> region_fwd(const carray<S>& x, const carray<S>& y, const carray<S>& mask,
                     int64_t num_threads) {
    check_region(x, y, mask);
    const int64_t T = x.shape(0), G = x.shape(1), D = x.shape(2), K = y.shape(1);
    const int nt = rcgrpo::resolve_threads(num_threads);
    carray<S> S_out({T, K, G, int64_t(2)});
    S* s_ptr = S_out.mutable_data();
    {
        py::gil_scoped_release release;
        rcgrpo::region_sq_dists_fwd_cpu(x.data(), y.data(), mask.data(), s_ptr, T, G, K, D, nt);
    }
    return S_out;
}

template <typename S>
py::tuple region_bwd(const carray<S>& dS, const carray<S>& x, const carray<S>& y,
                     const carray<S>& mask, int64_t num_threads) {
    check_region(x, y, mask);
    const int64_t T = x.shape(0), G = x.shape(1), D = x.shape(2), K = y.shape(1);
    require(dS.ndim() == 4 && dS.shape(0) == T && dS.shape(1) == K && dS.shape(2) == G &&
                dS.shape(3) == 2,
            "dS must have shape [T, K, G, 2] = (" + std::to_string(T) + ", " + std::to_string(K) +
                ", " + std::to_string(G) + ", 2), got " + shape_of(dS));
    const int nt = rcgrpo::resolve_threads(num_threads);
    carray<S> dx({T, G, D});
    carray<S> dy({T, K, D});
    S* dx_ptr = dx.mutable_data();
    S* dy_ptr = dy.mutable_data();
    {
        py::gil_scoped_release release;
        rcgrpo::region_sq_dists_bwd_cpu(dS.data(), x.data(), y.data(), mask.data(), dx_ptr, dy_ptr,
                                        T, G, K, D, nt);
    }
    return py::make_tuple(dx, dy);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "rcgrpo_kernels C++/OpenMP CPU backend: acd_attention and region_sq_dists";
    // Reads RCGRPO_CPU_ISA now: an invalid value fails the import with a ValueError that says so.
    rcgrpo::selected_isa();

    m.def("acd_attention", &acd_attention, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("text_len"), py::arg("image_len"), py::arg("scale"),
          py::arg("text_weights") = py::none(), py::arg("num_threads") = 0, py::arg("out") = py::none(),
          "q, k, v [B, H, N, D] float32 (any B/H/N strides, unit D stride) -> (out [B, H, N, D] float32, "
          "mass [B, image_len] float32). `out`: an optional float32 array of q's shape (any strides with "
          "unit D stride) that receives the output and is returned.");

    const char* fwd_doc = "x [T, G, D], y [T, K, D], mask [D] -> S [T, K, G, 2].";
    const char* bwd_doc = "dS [T, K, G, 2], x [T, G, D], y [T, K, D], mask [D] -> (dx, dy).";
    m.def("region_sq_dists_fwd_f32", &region_fwd<float>, py::arg("x"), py::arg("y"),
          py::arg("mask"), py::arg("num_threads") = 0, fwd_doc);
    m.def("region_sq_dists_fwd_f64", &region_fwd<double>, py::arg("x"), py::arg("y"),
          py::arg("mask"), py::arg("num_threads") = 0, fwd_doc);
    m.def("region_sq_dists_bwd_f32", &region_bwd<float>, py::arg("dS"), py::arg("x"), py::arg("y"),
          py::arg("mask"), py::arg("num_threads") = 0, bwd_doc);
    m.def("region_sq_dists_bwd_f64", &region_bwd<double>, py::arg("dS"), py::arg("x"),
          py::arg("y"), py::arg("mask"), py::arg("num_threads") = 0, bwd_doc);

    m.def("openmp_enabled", &rcgrpo::openmp_enabled, "Whether the extension was built with OpenMP.");
    m.def("cpu_isa", [] { return std::string(rcgrpo::isa_name(rcgrpo::selected_isa())); },
          "ISA level the kernels use: 'avx512', 'avx2' or 'baseline' (CPU features capped by RCGRPO_CPU_ISA).");
    m.def("cpu_isa_detected", [] { return std::string(rcgrpo::isa_name(rcgrpo::detected_isa())); },
          "Highest ISA level this CPU supports: 'avx512', 'avx2' or 'baseline'.");
    m.def("max_threads", &rcgrpo::max_threads, "Threads a parallel region uses by default.");
}
