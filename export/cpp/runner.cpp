// Run an exported clip-purify model (python -m export.onnx) with the ONNX Runtime C++ API.
//
//   runner MODEL.onnx [--raw BATCH.f32] [IMAGE.ppm ...] [--resize bilinear|nearest] [--repeat R] [--threads T]
//
// Inputs: a raw float32 file holding N preprocessed images (N, 3, H, W), and/or binary PPM (P6) files,
// which are resized (shorter side to the model's size, then a centre crop: export.predict's geometry)
// and normalised with the mean/std stored in the model's metadata. The resampling differs from
// export.predict's: bilinear or nearest here (--resize, torch's interpolate without antialiasing),
// PIL's antialiased bicubic there, so only images already at the model's size (no resampling in
// either) give the same logits; pass --raw batches for an exact comparison. Prints, per image, the
// top-1 class and the logits, then the inference time (median of --repeat runs of the whole batch).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Image {
  std::string name;
  std::vector<float> chw;  // 3 x S x S, normalised
};

struct Options {
  std::string model, raw, resize = "bilinear";
  std::vector<std::string> ppms;
  int repeat = 10, threads = 0;
};

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// A whole decimal number, all of `text` (std::stoi alone says "stoi" and accepts "4abc").
int whole_number(const std::string& text, const std::string& what) {
  size_t used = 0;
  int value = 0;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) fail(what + " needs a whole number, got '" + text + "'");
  return value;
}

// --- model metadata (export.onnx writes lists as JSON) -------------------------------------------

std::string metadata(const Ort::Session& session, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  auto value = session.GetModelMetadata().LookupCustomMetadataMapAllocated(key, alloc);
  if (!value) fail(std::string("model metadata lacks '") + key + "': not exported by export.onnx");
  return value.get();
}

std::vector<float> json_numbers(const std::string& s) {  // "[0.5, 0.5, 0.5]"
  std::vector<float> out;
  const char* p = s.c_str();
  while (*p) {
    if (std::isdigit(static_cast<unsigned char>(*p)) || *p == '-' || *p == '.') {
      char* end;
      out.push_back(std::strtof(p, &end));
      p = end;
    } else {
      ++p;
    }
  }
  return out;
}

std::vector<std::string> json_strings(const std::string& s) {  // ["t-shirt", "a \"quoted\" name"]
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '"') continue;
    std::string cur;
    for (++i; i < s.size() && s[i] != '"'; ++i) {
      if (s[i] == '\\' && i + 1 < s.size()) ++i;  // \" and \\ ; \uXXXX kept as written
      cur += s[i];
    }
    out.push_back(cur);
  }
  return out;
}

// --- inputs ------------------------------------------------------------------------------------

std::vector<Image> read_raw(const std::string& path, int size) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail("cannot open raw input " + path);
  const size_t bytes = static_cast<size_t>(f.tellg());
  const size_t per = 3ull * size * size * sizeof(float);
  if (bytes == 0 || bytes % per != 0)
    fail(path + ": " + std::to_string(bytes) + " bytes is not a whole number of float32 (3, " +
         std::to_string(size) + ", " + std::to_string(size) + ") images");
  f.seekg(0);
  std::vector<Image> out(bytes / per);
  for (size_t n = 0; n < out.size(); ++n) {
    out[n].name = path + "[" + std::to_string(n) + "]";
    out[n].chw.resize(per / sizeof(float));
    f.read(reinterpret_cast<char*>(out[n].chw.data()), per);
  }
  return out;
}

std::string ppm_token(std::istream& in) {  // header field, skipping whitespace and # comments
  std::string tok;
  int c;
  while ((c = in.get()) != EOF) {
    if (c == '#') {
      while ((c = in.get()) != EOF && c != '\n') {}
    } else if (std::isspace(c)) {
      if (!tok.empty()) return tok;
    } else {
      tok += static_cast<char>(c);
    }
  }
  return tok;
}

// PPM (P6) -> HWC floats in [0, 1].
std::vector<float> read_ppm(const std::string& path, int& w, int& h) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open image " + path);
  if (ppm_token(in) != "P6") fail(path + ": not a binary PPM (P6) file");
  try {
    w = std::stoi(ppm_token(in));
    h = std::stoi(ppm_token(in));
  } catch (const std::exception&) {
    fail(path + ": bad PPM header");
  }
  const int maxval = std::atoi(ppm_token(in).c_str());  // its trailing whitespace byte is consumed
  if (w <= 0 || h <= 0 || maxval <= 0 || maxval > 65535) fail(path + ": bad PPM header");
  const int bpp = maxval < 256 ? 1 : 2;
  std::vector<unsigned char> raw(static_cast<size_t>(w) * h * 3 * bpp);
  if (!in.read(reinterpret_cast<char*>(raw.data()), raw.size())) fail(path + ": truncated PPM data");
  std::vector<float> out(static_cast<size_t>(w) * h * 3);
  for (size_t i = 0; i < out.size(); ++i) {
    const int v = bpp == 1 ? raw[i] : (raw[2 * i] << 8 | raw[2 * i + 1]);
    out[i] = static_cast<float>(v) / maxval;
  }
  return out;
}

// Shorter side to `size`, centre crop, then (x - mean) / std, as CHW. The resized sides round half to
// even (nearbyint), like Python's round() in engine.data; sampling at pixel centres (align_corners=False),
// like torch's interpolate without antialiasing (not PIL's bicubic: see the top of this file).
Image preprocess_ppm(const std::string& path, int size, const std::string& mode, const std::vector<float>& mean,
                     const std::vector<float>& stdev) {
  int w, h;
  const std::vector<float> hwc = read_ppm(path, w, h);
  const double s = static_cast<double>(size) / std::min(w, h);
  const int rw = std::max(size, static_cast<int>(std::nearbyint(w * s)));
  const int rh = std::max(size, static_cast<int>(std::nearbyint(h * s)));
  const int left = (rw - size) / 2, top = (rh - size) / 2;
  const double sx = static_cast<double>(w) / rw, sy = static_cast<double>(h) / rh;
  auto px = [&](int x, int y, int c) { return hwc[(static_cast<size_t>(y) * w + x) * 3 + c]; };
  Image img{path, std::vector<float>(3ull * size * size)};
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      const double fx = (x + left + 0.5) * sx - 0.5, fy = (y + top + 0.5) * sy - 0.5;
      for (int c = 0; c < 3; ++c) {
        double v;
        if (mode == "nearest") {
          const int ix = std::min(w - 1, static_cast<int>(std::floor((x + left) * sx)));
          const int iy = std::min(h - 1, static_cast<int>(std::floor((y + top) * sy)));
          v = px(ix, iy, c);
        } else {
          const double cx = std::max(0.0, fx), cy = std::max(0.0, fy);
          const int x0 = std::min(w - 1, static_cast<int>(cx)), y0 = std::min(h - 1, static_cast<int>(cy));
          const int x1 = std::min(w - 1, x0 + 1), y1 = std::min(h - 1, y0 + 1);
          const double ax = cx - x0, ay = cy - y0;
          v = (1 - ay) * ((1 - ax) * px(x0, y0, c) + ax * px(x1, y0, c)) +
              ay * ((1 - ax) * px(x0, y1, c) + ax * px(x1, y1, c));
        }
        img.chw[(static_cast<size_t>(c) * size + y) * size + x] = static_cast<float>((v - mean[c]) / stdev[c]);
      }
    }
  }
  return img;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) fail("missing value after " + a);
      return argv[++i];
    };
    if (a == "--raw") o.raw = next();
    else if (a == "--resize") o.resize = next();
    else if (a == "--repeat") o.repeat = whole_number(next(), a);
    else if (a == "--threads") o.threads = whole_number(next(), a);
    else if (a == "-h" || a == "--help") fail("help");
    else if (!a.empty() && a[0] == '-') fail("unknown option " + a);
    else if (o.model.empty()) o.model = a;
    else o.ppms.push_back(a);
  }
  if (o.model.empty() || (o.raw.empty() && o.ppms.empty())) fail("help");
  if (o.resize != "bilinear" && o.resize != "nearest") fail("--resize must be bilinear or nearest");
  if (o.repeat < 1) fail("--repeat must be at least 1");
  if (o.threads < 0) fail("--threads must be 0 (ORT's default) or more");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse(argc, argv);
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "clip-purify-runner");
    Ort::SessionOptions so;
    if (opt.threads > 0) so.SetIntraOpNumThreads(opt.threads);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    Ort::Session session(env, opt.model.c_str(), so);

    const auto classes = json_strings(metadata(session, "classes"));
    const int size = whole_number(metadata(session, "image_size"), "model metadata image_size");
    const auto mean = json_numbers(metadata(session, "mean")), stdev = json_numbers(metadata(session, "std"));
    if (mean.size() != 3 || stdev.size() != 3) fail("model metadata: mean/std must have 3 values");

    std::vector<Image> images;
    if (!opt.raw.empty()) images = read_raw(opt.raw, size);
    for (const auto& p : opt.ppms) images.push_back(preprocess_ppm(p, size, opt.resize, mean, stdev));

    const int64_t n = static_cast<int64_t>(images.size());
    std::vector<float> batch;
    batch.reserve(n * 3ull * size * size);
    for (const auto& im : images) batch.insert(batch.end(), im.chw.begin(), im.chw.end());
    const std::vector<int64_t> shape{n, 3, size, size};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, batch.data(), batch.size(), shape.data(), shape.size());

    Ort::AllocatorWithDefaultOptions alloc;
    const auto in_name = session.GetInputNameAllocated(0, alloc);
    const auto out_name = session.GetOutputNameAllocated(0, alloc);  // logits
    const char* in_names[] = {in_name.get()};
    const char* out_names[] = {out_name.get()};

    std::vector<Ort::Value> out;
    std::vector<double> ms;
    for (int r = 0; r <= opt.repeat; ++r) {  // run 0 is the warm-up
      const auto t0 = std::chrono::steady_clock::now();
      out = session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
      const auto t1 = std::chrono::steady_clock::now();
      if (r > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    const auto oshape = out[0].GetTensorTypeAndShapeInfo().GetShape();
    const int64_t k = oshape.at(1);
    if (static_cast<size_t>(k) != classes.size()) fail("model has " + std::to_string(k) + " logits but " +
                                                       std::to_string(classes.size()) + " class names");
    const float* logits = out[0].GetTensorData<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float* row = logits + i * k;
      const int64_t best = std::max_element(row, row + k) - row;
      std::printf("image %lld %s top1 %lld %s logits", static_cast<long long>(i), images[i].name.c_str(),
                  static_cast<long long>(best), classes[best].c_str());
      for (int64_t j = 0; j < k; ++j) std::printf(" %.9g", row[j]);
      std::printf("\n");
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2];
    std::printf("time batch %lld median %.3f ms (%d runs), %.1f images/s, CPU provider\n", static_cast<long long>(n),
                median, opt.repeat, 1000.0 * n / median);
    return 0;
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "error: onnxruntime: %s\n", e.what());
  } catch (const std::exception& e) {
    if (std::string(e.what()) == "help") {
      std::fprintf(stderr,
                   "usage: runner MODEL.onnx [--raw BATCH.f32] [IMAGE.ppm ...] [--resize bilinear|nearest] "
                   "[--repeat R] [--threads T]\n");
    } else {
      std::fprintf(stderr, "error: %s\n", e.what());
    }
  }
  return 2;
}
