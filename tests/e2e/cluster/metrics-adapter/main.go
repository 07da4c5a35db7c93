// Command metrics-adapter is the e2e cluster's custom-metrics API (custom.metrics.k8s.io), a
// test-only stand-in for prometheus-adapter (not served by the Go module proxy here). It serves
// one metric, pricestream_sessions_active per pod, read from Prometheus with the rule of
// deploy/kind/prometheus-adapter-values.yaml:
//
//	max by (namespace, pod) (pricestream_sessions_active{namespace="NS", pod=~"POD|..."})
//
// Built on sigs.k8s.io/custom-metrics-apiserver, the library prometheus-adapter is built on.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	apimeta "k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/component-base/logs"
	"k8s.io/klog/v2"
	"k8s.io/metrics/pkg/apis/custom_metrics"
	"k8s.io/metrics/pkg/apis/external_metrics"

	basecmd "sigs.k8s.io/custom-metrics-apiserver/pkg/cmd"
	"sigs.k8s.io/custom-metrics-apiserver/pkg/provider"
	"sigs.k8s.io/custom-metrics-apiserver/pkg/provider/helpers"
)

const metricName = "pricestream_sessions_active"

var podsInfo = provider.CustomMetricInfo{
	GroupResource: schema.GroupResource{Resource: "pods"},
	Namespaced:    true,
	Metric:        metricName,
}

type sessionsProvider struct {
	client     dynamic.Interface
	mapper     apimeta.RESTMapper
	prometheus string
	http       *http.Client
}

func (p *sessionsProvider) ListAllMetrics() []provider.CustomMetricInfo {
	return []provider.CustomMetricInfo{podsInfo}
}

func (p *sessionsProvider) ListAllExternalMetrics() []provider.ExternalMetricInfo { return nil }

func (p *sessionsProvider) GetExternalMetric(context.Context, string, labels.Selector, provider.ExternalMetricInfo) (*external_metrics.ExternalMetricValueList, error) {
	return nil, fmt.Errorf("no external metrics")
}

func supported(info provider.CustomMetricInfo) error {
	if info.Metric != metricName || info.GroupResource.Resource != "pods" {
		return fmt.Errorf("metric %s is not served (only pods/%s)", info, metricName)
	}
	return nil
}

func (p *sessionsProvider) GetMetricByName(ctx context.Context, name types.NamespacedName, info provider.CustomMetricInfo, _ labels.Selector) (*custom_metrics.MetricValue, error) {
	if err := supported(info); err != nil {
		return nil, err
	}
	values, err := p.query(ctx, name.Namespace, []string{name.Name})
	if err != nil {
		return nil, err
	}
	v, ok := values[name.Name]
	if !ok {
		return nil, fmt.Errorf("no %s for pod %s", metricName, name)
	}
	return p.value(name, info, v)
}

func (p *sessionsProvider) GetMetricBySelector(ctx context.Context, namespace string, selector labels.Selector, info provider.CustomMetricInfo, _ labels.Selector) (*custom_metrics.MetricValueList, error) {
	if err := supported(info); err != nil {
		return nil, err
	}
	names, err := helpers.ListObjectNames(p.mapper, p.client, namespace, selector, info)
	if err != nil {
		return nil, err
	}
	list := &custom_metrics.MetricValueList{}
	if len(names) == 0 {
		return list, nil
	}
	values, err := p.query(ctx, namespace, names)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		v, ok := values[n]
		if !ok {
			continue // a pod not scraped yet has no value, as with prometheus-adapter
		}
		mv, err := p.value(types.NamespacedName{Namespace: namespace, Name: n}, info, v)
		if err != nil {
			return nil, err
		}
		list.Items = append(list.Items, *mv)
	}
	return list, nil
}

func (p *sessionsProvider) value(name types.NamespacedName, info provider.CustomMetricInfo, v float64) (*custom_metrics.MetricValue, error) {
	ref, err := helpers.ReferenceFor(p.mapper, name, info)
	if err != nil {
		return nil, err
	}
	return &custom_metrics.MetricValue{
		DescribedObject: ref,
		Metric:          custom_metrics.MetricIdentifier{Name: metricName},
		Timestamp:       metav1.Now(),
		Value:           *resource.NewMilliQuantity(int64(v*1000), resource.DecimalSI),
	}, nil
}

// query asks Prometheus for the metric of the named pods: pod name -> value.
func (p *sessionsProvider) query(ctx context.Context, namespace string, pods []string) (map[string]float64, error) {
	quoted := make([]string, len(pods))
	for i, n := range pods {
		quoted[i] = regexp.QuoteMeta(n)
	}
	q := fmt.Sprintf(`max by (namespace, pod) (%s{namespace=%q, pod=~%q})`,
		metricName, namespace, strings.Join(quoted, "|"))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		p.prometheus+"/api/v1/query?query="+url.QueryEscape(q), nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("prometheus: %w", err)
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, fmt.Errorf("prometheus answer: %w", err)
	}
	if body.Status != "success" {
		return nil, fmt.Errorf("prometheus: %s", body.Error)
	}
	out := make(map[string]float64, len(body.Data.Result))
	for _, r := range body.Data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("prometheus value %q: %w", s, err)
		}
		out[r.Metric["pod"]] = v
	}
	return out, nil
}

func main() {
	logs.InitLogs()
	defer logs.FlushLogs()
	cmd := &basecmd.AdapterBase{Name: "pricestream-e2e-metrics-adapter"}
	var prom string
	cmd.Flags().StringVar(&prom, "prometheus-url", "http://127.0.0.1:9090", "Prometheus to read the metric from")
	logs.AddFlags(cmd.Flags())
	if err := cmd.Flags().Parse(os.Args); err != nil {
		klog.Fatalf("flags: %v", err)
	}
	client, err := cmd.DynamicClient()
	if err != nil {
		klog.Fatalf("dynamic client: %v", err)
	}
	mapper, err := cmd.RESTMapper()
	if err != nil {
		klog.Fatalf("REST mapper: %v", err)
	}
	cmd.WithCustomMetrics(&sessionsProvider{
		client: client, mapper: mapper, prometheus: strings.TrimRight(prom, "/"),
		http: &http.Client{Timeout: 5 * time.Second},
	})
	if err := cmd.Run(context.Background()); err != nil {
		klog.Fatalf("run: %v", err)
	}
}
