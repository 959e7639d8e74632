// Loads libgammamod_plugins.so as TensorRT would (dlopen, getCreators, setLoggerFinder) and
// exercises the creators and plugins without TensorRT's library or a GPU: names, fields,
// serialisation, types, formats, and getOutputShapes through a stand-in IExprBuilder that
// evaluates every dimension to a number. Built and run by tests/test_plugins.py when
// TENSORRT_INCLUDE_DIR is set. Prints one line per check; exit status 1 on any failure.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gFailures = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s: %s\n", ok ? "ok" : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
}

struct Logger : ILogger
{
    std::vector<std::string> errors;
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
            errors.emplace_back(msg);
    }
};

struct LoggerFinder : ILoggerFinder
{
    Logger logger;
    ILogger* findLogger() override
    {
        return &logger;
    }
};

// Dimension expressions that are numbers: enough to evaluate a plugin's output shapes.
struct NumberImpl : apiv::VDimensionExpr
{
    int64_t value;
    explicit NumberImpl(int64_t v)
        : value(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return value;
    }
    bool isSizeTensor() const override
    {
        return false;
    }
};

struct Number : IDimensionExpr
{
    NumberImpl impl;
    explicit Number(int64_t v)
        : impl(v)
    {
        mImpl = &impl;
    }
};

struct NumberBuilderImpl : apiv::VExprBuilder
{
    std::vector<std::unique_ptr<Number>> made;
    IDimensionExpr const* constant(int64_t value) override
    {
        made.push_back(std::make_unique<Number>(value));
        return made.back().get();
    }
    IDimensionExpr const* operation(
        DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        int64_t const a = first.getConstantValue(), b = second.getConstantValue();
        switch (op)
        {
        case DimensionOperation::kSUM: return constant(a + b);
        case DimensionOperation::kSUB: return constant(a - b);
        case DimensionOperation::kPROD: return constant(a * b);
        case DimensionOperation::kMAX: return constant(a > b ? a : b);
        case DimensionOperation::kMIN: return constant(a < b ? a : b);
        default: return nullptr;
        }
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
};

struct NumberBuilder : IExprBuilder
{
    NumberBuilderImpl impl;
    NumberBuilder()
    {
        mImpl = &impl;
    }
};

DimsExprs dims(NumberBuilder& b, std::vector<int64_t> const& values)
{
    DimsExprs d{};
    d.nbDims = static_cast<int32_t>(values.size());
    for (size_t i = 0; i < values.size(); ++i)
        d.d[i] = b.constant(values[i]);
    return d;
}

std::vector<int64_t> numbers(DimsExprs const& d)
{
    std::vector<int64_t> out;
    for (int32_t i = 0; i < d.nbDims; ++i)
        out.push_back(d.d[i] ? d.d[i]->getConstantValue() : -999);
    return out;
}

DynamicPluginTensorDesc desc(DataType type, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    return d;
}

struct Plugin
{
    IPluginV3* v3;
    IPluginV3OneCore* core;
    IPluginV3OneBuild* build;
    IPluginV3OneRuntime* runtime;
    explicit Plugin(IPluginV3* p)
        : v3(p)
        , core(p ? static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)) : nullptr)
        , build(p ? static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD)) : nullptr)
        , runtime(p ? static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                    : nullptr)
    {
    }
};

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: plugin_probe LIBRARY\n");
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    check(lib != nullptr, std::string("dlopen with every symbol resolved: ") + (lib ? "" : dlerror()));
    if (!lib)
        return 1;
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    check(getCreators && setLoggerFinder, "exports getCreators and setLoggerFinder");
    if (!getCreators || !setLoggerFinder)
        return 1;
    static LoggerFinder finder;
    setLoggerFinder(&finder);

    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 4, "four creators");
    char const* names[] = {"MoDSelect", "MoDSelectThreshold", "MoDGather", "MoDScatter"};
    IPluginCreatorV3One* byName[4] = {};
    for (int32_t i = 0; i < count; ++i)
    {
        check(std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
            "creator " + std::to_string(i) + " is an IPluginCreatorV3One");
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        for (int j = 0; j < 4; ++j)
            if (std::strcmp(c->getPluginName(), names[j]) == 0)
                byName[j] = c;
        check(std::strcmp(c->getPluginVersion(), "1") == 0 && std::strcmp(c->getPluginNamespace(), "gammamod") == 0,
            std::string(c->getPluginName()) + ": version 1, namespace gammamod");
    }
    for (int j = 0; j < 4; ++j)
        check(byName[j] != nullptr, std::string("a creator named ") + names[j]);
    if (gFailures)
        return 1;
    IPluginCreatorV3One *select = byName[0], *threshold = byName[1], *gather = byName[2], *scatter = byName[3];

    PluginFieldCollection const* fields = threshold->getFieldNames();
    check(fields->nbFields == 1 && std::strcmp(fields->fields[0].name, "threshold") == 0
            && fields->fields[0].type == PluginFieldType::kFLOAT32,
        "MoDSelectThreshold lists one field, threshold (FLOAT32)");
    check(select->getFieldNames()->nbFields == 0 && gather->getFieldNames()->nbFields == 0
            && scatter->getFieldNames()->nbFields == 0,
        "MoDSelect, MoDGather, MoDScatter list no fields");

    // attributes as the parser passes them, and as a 64-bit float
    float const t32 = 0.25f;
    double const t64 = 0.75;
    PluginField f32("threshold", &t32, PluginFieldType::kFLOAT32, 1);
    PluginField f64("threshold", &t64, PluginFieldType::kFLOAT64, 1);
    PluginFieldCollection fc32{1, &f32}, fc64{1, &f64}, none{0, nullptr};
    Plugin thr(threshold->createPlugin("node", &fc32, TensorRTPhase::kBUILD));
    check(thr.core && thr.build && thr.runtime, "MoDSelectThreshold plugin has core, build and runtime capabilities");
    PluginFieldCollection const* saved = thr.runtime->getFieldsToSerialize();
    check(saved->nbFields == 1 && saved->fields[0].type == PluginFieldType::kFLOAT32
            && *static_cast<float const*>(saved->fields[0].data) == 0.25f,
        "threshold 0.25 (FLOAT32) serialised");
    Plugin again(threshold->createPlugin("node", saved, TensorRTPhase::kRUNTIME));
    check(again.runtime && *static_cast<float const*>(again.runtime->getFieldsToSerialize()->fields[0].data) == 0.25f,
        "runtime plugin from the serialised fields keeps the threshold");
    Plugin wide(threshold->createPlugin("node", &fc64, TensorRTPhase::kBUILD));
    check(wide.runtime && *static_cast<float const*>(wide.runtime->getFieldsToSerialize()->fields[0].data) == 0.75f,
        "a FLOAT64 threshold is accepted");
    size_t const before = finder.logger.errors.size();
    check(threshold->createPlugin("node", &none, TensorRTPhase::kBUILD) == nullptr
            && finder.logger.errors.size() == before + 1,
        "MoDSelectThreshold without a threshold is refused, with an error logged");
    Plugin copy(thr.v3->clone());
    check(copy.runtime && *static_cast<float const*>(copy.runtime->getFieldsToSerialize()->fields[0].data) == 0.25f,
        "clone keeps the threshold");

    // MoDSelect: execution inputs scores, span_start, span_length, capacity; shape inputs N, k
    Plugin sel(select->createPlugin("node", &none, TensorRTPhase::kBUILD));
    check(std::strcmp(sel.core->getPluginName(), "MoDSelect") == 0 && sel.build->getNbOutputs() == 1,
        "MoDSelect: one output");
    check(sel.runtime->getFieldsToSerialize()->nbFields == 0, "MoDSelect serialises no field");
    {
        NumberBuilder b;
        DimsExprs in[4] = {dims(b, {2, 620}), dims(b, {2}), dims(b, {}), dims(b, {})};
        DimsExprs shape[2] = {dims(b, {576}), dims(b, {486})};
        DimsExprs out[1];
        check(sel.build->getOutputShapes(in, 4, shape, 2, out, 1, b) == 0 && numbers(out[0]) == std::vector<int64_t>{2, 530},
            "MoDSelect output shape [B, T - N + k] = [2, 530] for T 620, N 576, k 486");
        DimsExprs out2[2];
        check(thr.build->getOutputShapes(in, 4, shape, 2, out2, 2, b) == 0
                && numbers(out2[0]) == std::vector<int64_t>{2, 530} && numbers(out2[1]) == std::vector<int64_t>{2},
            "MoDSelectThreshold output shapes [2, 530] and [2]");
        size_t const logged = finder.logger.errors.size();
        check(sel.build->getOutputShapes(in, 2, shape, 2, out, 1, b) != 0 && finder.logger.errors.size() > logged,
            "MoDSelect without the span values as execution inputs is refused, with the reason logged");
    }
    DataType types[4] = {DataType::kHALF, DataType::kINT64, DataType::kINT64, DataType::kINT64};
    DataType outTypes[2] = {DataType::kFLOAT, DataType::kFLOAT};
    check(thr.build->getOutputDataTypes(outTypes, 2, types, 4) == 0 && outTypes[0] == DataType::kINT64
            && outTypes[1] == DataType::kINT64,
        "MoDSelectThreshold outputs int64 kept and kept_count");
    for (DataType score : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DynamicPluginTensorDesc io[5] = {desc(score), desc(DataType::kINT64), desc(DataType::kINT64),
            desc(DataType::kINT64), desc(DataType::kINT64)};
        bool all = true;
        for (int32_t pos = 0; pos < 5; ++pos)
            all = all && sel.build->supportsFormatCombination(pos, io, 4, 1);
        check(all, "MoDSelect takes scores of type " + std::to_string(static_cast<int>(score)) + ", int64 elsewhere");
    }
    {
        DynamicPluginTensorDesc io[5] = {desc(DataType::kINT8), desc(DataType::kINT32), desc(DataType::kINT64),
            desc(DataType::kINT64), desc(DataType::kINT64)};
        check(!sel.build->supportsFormatCombination(0, io, 4, 1) && !sel.build->supportsFormatCombination(1, io, 4, 1),
            "MoDSelect refuses int8 scores and int32 span starts");
        DynamicPluginTensorDesc chw[1] = {desc(DataType::kFLOAT, TensorFormat::kCHW32)};
        check(!sel.build->supportsFormatCombination(0, chw, 4, 1), "MoDSelect refuses a non-linear format");
    }

    // MoDGather and MoDScatter
    Plugin gat(gather->createPlugin("node", &none, TensorRTPhase::kBUILD));
    Plugin sca(scatter->createPlugin("node", &none, TensorRTPhase::kBUILD));
    {
        NumberBuilder b;
        DimsExprs in[3] = {dims(b, {2, 620, 4096}), dims(b, {2, 530}), dims(b, {2, 530, 4096})};
        DimsExprs out[1];
        check(gat.build->getOutputShapes(in, 2, nullptr, 0, out, 1, b) == 0
                && numbers(out[0]) == std::vector<int64_t>{2, 530, 4096},
            "MoDGather output [B, K, H] = [2, 530, 4096]");
        check(sca.build->getOutputShapes(in, 3, nullptr, 0, out, 1, b) == 0
                && numbers(out[0]) == std::vector<int64_t>{2, 620, 4096},
            "MoDScatter output [B, T, H] = [2, 620, 4096]");
    }
    for (DataType x : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DynamicPluginTensorDesc io[4] = {desc(x), desc(DataType::kINT64), desc(x), desc(x)};
        DataType in[3] = {x, DataType::kINT64, x}, out[1] = {DataType::kINT8};
        bool ok = gat.build->getOutputDataTypes(out, 1, in, 2) == 0 && out[0] == x;
        for (int32_t pos = 0; pos < 3; ++pos)
            ok = ok && gat.build->supportsFormatCombination(pos, io, 2, 1);
        for (int32_t pos = 0; pos < 4; ++pos)
            ok = ok && sca.build->supportsFormatCombination(pos, io, 3, 1);
        check(ok, "MoDGather and MoDScatter keep x's type " + std::to_string(static_cast<int>(x)));
    }
    {
        DynamicPluginTensorDesc io[4] = {desc(DataType::kHALF), desc(DataType::kINT64), desc(DataType::kFLOAT),
            desc(DataType::kHALF)};
        check(!sca.build->supportsFormatCombination(2, io, 3, 1), "MoDScatter refuses y of another type than x");
        DynamicPluginTensorDesc in[3] = {desc(DataType::kHALF), desc(DataType::kINT64), desc(DataType::kHALF)};
        in[0].max.nbDims = 3;
        in[0].max.d[0] = 8;
        in[0].max.d[1] = 2880;
        in[0].max.d[2] = 4096;
        check(sca.build->getWorkspaceSize(in, 3, nullptr, 1) == 8u * 2880u * 4u,
            "MoDScatter's workspace: 4 bytes per token of the largest batch");
        check(gat.build->getWorkspaceSize(in, 2, nullptr, 1) == 0, "MoDGather needs no workspace");
    }
    std::printf("%d failures\n", gFailures);
    return gFailures ? 1 : 0;
}
