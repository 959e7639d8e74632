// TensorRT IPluginV3 plugins for gammamod's MoD nodes: MoDSelect, MoDSelectThreshold, MoDGather,
// MoDScatter (namespace "gammamod", version "1"), for TensorRT 10.3 to 11.x from one source.
//
// Loaded dynamically (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary, Python
// load_library) through the two extern "C" entry points at the end; no REGISTER_TENSORRT_PLUGIN,
// which would make loadLibrary fail on a creator registered twice.
//
// Inputs as the ONNX parser passes them. MoDSelect / MoDSelectThreshold: execution inputs
// scores [B,T], span_start [B] (int64), span_length and capacity (int64 values: node inputs 4
// and 5, the same tensors as inputs 2 and 3), and shape inputs span_length and capacity (node
// inputs 2 and 3, `tensorrt_plugin_shape_input_indices = [2, 3]`). TensorRT gives a shape
// input's value to getOutputShapes only, never to enqueue, so the kernel reads N and k from the
// execution copies that gammamod's TensorRT graphs add (engines/prepare.py).
#include <NvInferRuntime.h>

#include "mod_launch.h"

#include <atomic>
#include <cstring>
#include <new>
#include <string>

namespace gammamod
{
namespace
{

using namespace nvinfer1;

constexpr char const* kPluginNamespace = "gammamod";
constexpr char const* kPluginVersion = "1";

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void log_error(std::string const& message) noexcept
{
    ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
        logger->log(ILogger::Severity::kERROR, ("gammamod plugin: " + message).c_str());
}

enum class Node
{
    kSelect,
    kSelectThreshold,
    kGather,
    kScatter
};

char const* node_name(Node node) noexcept
{
    switch (node)
    {
    case Node::kSelect: return "MoDSelect";
    case Node::kSelectThreshold: return "MoDSelectThreshold";
    case Node::kGather: return "MoDGather";
    case Node::kScatter: return "MoDScatter";
    }
    return "";
}

bool is_select(Node node) noexcept
{
    return node == Node::kSelect || node == Node::kSelectThreshold;
}

// Execution inputs TensorRT passes to enqueue, and outputs.
int32_t execution_inputs(Node node) noexcept
{
    return is_select(node) ? 4 : (node == Node::kGather ? 2 : 3);
}

int32_t outputs_of(Node node) noexcept
{
    return node == Node::kSelectThreshold ? 2 : 1;
}

bool is_float(DataType type) noexcept
{
    return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

int64_t float_bytes(DataType type) noexcept
{
    return type == DataType::kFLOAT ? 4 : 2;
}

// A numeric plugin field as a double: the parser passes FLOAT attributes as kFLOAT32 and INT
// ones as kINT32; builders in Python may pass 64-bit values.
bool field_number(PluginField const& field, double& value) noexcept
{
    if (field.data == nullptr || field.length < 1)
        return false;
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(field.data); return true;
    case PluginFieldType::kFLOAT64: value = *static_cast<double const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = static_cast<double>(*static_cast<int64_t const*>(field.data)); return true;
    default: return false;
    }
}

// The node's name, version and namespace: the plugin's core interface and the creator both answer them.
template <class Interface>
class NodeIdentity : public Interface
{
public:
    explicit NodeIdentity(Node node) noexcept
        : mNode(node)
    {
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return node_name(mNode);
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

protected:
    Node mNode;
};

class ModPlugin final : public IPluginV3,
                        public NodeIdentity<IPluginV3OneCore>,
                        public IPluginV3OneBuild,
                        public IPluginV3OneRuntime
{
public:
    ModPlugin(Node node, float threshold) noexcept
        : NodeIdentity(node)
        , mThreshold(threshold)
    {
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) ModPlugin(mNode, mThreshold);
    }

    // IPluginV3OneBuild
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return checkCounts(nbInputs, nbOutputs) ? 0 : 1;
    }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
        int32_t nbInputs) const noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
            return 1;
        for (int32_t i = 0; i < nbOutputs; ++i)
            outputTypes[i] = is_select(mNode) ? DataType::kINT64 : inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs))
            return 1;
        if (is_select(mNode))
        {
            // [B, T - N + k]: N and k are the shape inputs' values
            if (nbShapeInputs != 2 || shapeInputs[0].nbDims < 1 || shapeInputs[1].nbDims < 1 || inputs[0].nbDims != 2)
            {
                log_error(std::string(node_name(mNode)) + ": expected scores [B, T] and span_length, capacity as "
                    "shape inputs (node attribute tensorrt_plugin_shape_input_indices = [2, 3])");
                return 1;
            }
            IDimensionExpr const* dropped
                = exprBuilder.operation(DimensionOperation::kSUB, *shapeInputs[0].d[0], *shapeInputs[1].d[0]);
            outputs[0].nbDims = 2;
            outputs[0].d[0] = inputs[0].d[0];
            outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kSUB, *inputs[0].d[1], *dropped);
            if (mNode == Node::kSelectThreshold)
            {
                outputs[1].nbDims = 1;
                outputs[1].d[0] = inputs[0].d[0];
            }
            return 0;
        }
        if (nbShapeInputs != 0 || inputs[0].nbDims != 3 || inputs[1].nbDims != 2)
        {
            log_error(std::string(node_name(mNode)) + ": expected x [B, T, H] and kept [B, K], no shape inputs");
            return 1;
        }
        outputs[0] = inputs[0]; // MoDScatter: x's shape
        if (mNode == Node::kGather)
            outputs[0].d[1] = inputs[1].d[1]; // [B, K, H]
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (!checkCounts(nbInputs, nbOutputs) || pos < 0 || pos >= nbInputs + nbOutputs)
            return false;
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return is_float(desc.type);
        if (is_select(mNode) || pos == 1) // indices, counts, span values
            return desc.type == DataType::kINT64;
        return desc.type == inOut[0].desc.type; // y and the output: x's type
    }

    int32_t getNbOutputs() const noexcept override
    {
        return outputs_of(mNode);
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        return mNode == Node::kScatter ? scatter_workspace_bytes(inputs[0].max.d[0], inputs[0].max.d[1]) : 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return checkCounts(nbInputs, nbOutputs) ? 0 : 1;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& x = inputDesc[0].dims;
        cudaError_t status = cudaSuccess;
        switch (mNode)
        {
        case Node::kSelect:
        case Node::kSelectThreshold:
        {
            DataType const type = inputDesc[0].type;
            ScoreType const scores = type == DataType::kFLOAT
                ? ScoreType::kFloat
                : (type == DataType::kHALF ? ScoreType::kHalf : ScoreType::kBFloat16);
            status = launch_select(scores, inputs[0], static_cast<int64_t const*>(inputs[1]),
                static_cast<int64_t const*>(inputs[2]), static_cast<int64_t const*>(inputs[3]),
                static_cast<int64_t*>(outputs[0]),
                mNode == Node::kSelectThreshold ? static_cast<int64_t*>(outputs[1]) : nullptr, x.d[0], x.d[1],
                outputDesc[0].dims.d[1], mNode == Node::kSelectThreshold, mThreshold, stream);
            break;
        }
        case Node::kGather:
            status = launch_gather(inputs[0], static_cast<int64_t const*>(inputs[1]), outputs[0], x.d[0], x.d[1],
                inputDesc[1].dims.d[1], x.d[2] * float_bytes(inputDesc[0].type), stream);
            break;
        case Node::kScatter:
            status = launch_scatter(inputs[0], static_cast<int64_t const*>(inputs[1]), inputs[2], outputs[0],
                workspace, x.d[0], x.d[1], inputDesc[1].dims.d[1], x.d[2] * float_bytes(inputDesc[0].type), stream);
            break;
        }
        if (status != cudaSuccess)
        {
            log_error(std::string(node_name(mNode)) + ": kernel launch failed: " + cudaGetErrorString(status));
            return 1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override
    {
        return clone();
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mFields = PluginField("threshold", &mThreshold, PluginFieldType::kFLOAT32, 1);
        mFieldCollection.nbFields = mNode == Node::kSelectThreshold ? 1 : 0;
        mFieldCollection.fields = &mFields;
        return &mFieldCollection;
    }

private:
    bool checkCounts(int32_t nbInputs, int32_t nbOutputs) const noexcept
    {
        if (nbInputs == execution_inputs(mNode) && nbOutputs == outputs_of(mNode))
            return true;
        if (is_select(mNode) && nbInputs == 2)
            log_error(std::string(node_name(mNode)) + ": span_length and capacity must also reach the plugin as "
                "execution inputs (node inputs 4 and 5): TensorRT gives shape inputs' values to getOutputShapes only. "
                "Build from the TensorRT copy 'gammamod export --for-tensorrt' writes");
        else
            log_error(std::string(node_name(mNode)) + ": expected " + std::to_string(execution_inputs(mNode))
                + " inputs and " + std::to_string(outputs_of(mNode)) + " outputs, got " + std::to_string(nbInputs)
                + " and " + std::to_string(nbOutputs));
        return false;
    }

    float mThreshold;
    PluginField mFields;
    PluginFieldCollection mFieldCollection{};
};

class ModPluginCreator final : public NodeIdentity<IPluginCreatorV3One>
{
public:
    explicit ModPluginCreator(Node node) noexcept
        : NodeIdentity(node)
    {
        mFieldNames = PluginField("threshold", nullptr, PluginFieldType::kFLOAT32, 1);
        mFieldCollection.nbFields = node == Node::kSelectThreshold ? 1 : 0;
        mFieldCollection.fields = &mFieldNames;
    }

    IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        double threshold = 0.0;
        bool found = false;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr || std::strcmp(field.name, "threshold") != 0)
                continue; // only fields we list are passed by the parser; others are not ours
            if (!field_number(field, threshold))
            {
                log_error("MoDSelectThreshold: attribute 'threshold' must be a number");
                return nullptr;
            }
            found = true;
        }
        if (mNode == Node::kSelectThreshold && !found)
        {
            log_error("MoDSelectThreshold: the node has no 'threshold' attribute");
            return nullptr;
        }
        return new (std::nothrow) ModPlugin(mNode, static_cast<float>(threshold));
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

private:
    PluginField mFieldNames;
    PluginFieldCollection mFieldCollection{};
};

} // namespace
} // namespace gammamod

extern "C"
{

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    gammamod::gLoggerFinder.store(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    using gammamod::ModPluginCreator;
    using gammamod::Node;
    static ModPluginCreator select(Node::kSelect), selectThreshold(Node::kSelectThreshold), gather(Node::kGather),
        scatter(Node::kScatter);
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&select, &selectThreshold, &gather, &scatter};
    nbCreators = 4;
    return creators;
}

} // extern "C"
